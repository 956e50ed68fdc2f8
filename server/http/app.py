"""The OpenAI-compatible ASGI app: /v1/completions, /v1/chat/completions, /v1/models, /health, /v1/adapters."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from server.adapters.manager import AdapterManager
from server.engine.engine import Engine
from server.engine.errors import InvalidRequest, Overloaded, ShuttingDown, UnknownAdapter
from server.engine.request import FinishReason
from server.http import admin, errors
from server.http.errors import ApiError
from server.http.responses import ChunkWriter, TokenText, answer, sse
from server.http.schemas import ChatCompletionRequest, CompletionRequest
from server.http.sse import EventStreamResponse
from server.http.streams import MultiStream
from server.http.translate import Job, chat_job, completion_job
from server.security.keys import ApiKeys

log = logging.getLogger("deltaserve.http")

SUBMIT_ERRORS = (InvalidRequest, UnknownAdapter, Overloaded, ShuttingDown)
T = TypeVar("T")


@dataclass
class HttpContext:
    """What the routes need from the server: the engine, the served names, the checks."""

    engine: Engine
    model_id: str                                   # the base model's id as served
    adapter_names: Callable[[], list[str]]          # the registered (servable) adapters
    healthy: Callable[[], Awaitable[bool]]          # whether the gRPC health status is SERVING
    api_keys: ApiKeys = field(default_factory=ApiKeys)
    admin_token: str = ""
    manager: AdapterManager | None = None
    max_top_logprobs: int = 20
    max_model_len: int = 0
    started: int = field(default_factory=lambda: int(time.time()))


def _require_key(context: HttpContext) -> Callable[[Request], None]:
    def check(request: Request) -> None:
        if not context.api_keys.allows(request.headers.get("authorization")):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
    return check


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Runs `work`, cancelling it if the client disconnects first (its engine requests are then cancelled)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    return await task


async def _whole(context: HttpContext, job: Job) -> dict[str, Any]:
    try:
        async with MultiStream(context.engine, job.requests) as stream:
            results = await stream.results()
    except Exception as error:
        raise errors.from_domain(error, job.model) from error
    if any(r.finish_reason is FinishReason.CANCELLED for r in results):
        raise ApiError(503, "the request was cancelled by the server before it finished (shutting down, or an "
                       "engine failure)", "server_error", code="cancelled")
    return answer(job, results, int(time.time()), TokenText(context.engine.encoder))


async def _events(stream: MultiStream, writer: ChunkWriter, job: Job) -> AsyncIterator[bytes]:
    for event in writer.start():
        yield event
    try:
        async for index, out in stream.outputs():
            for event in writer.output(index, out):
                yield event
    except Exception as error:    # after the headers: OpenAI's clients read an error event
        yield sse(errors.from_domain(error, job.model).body())
    for event in writer.end():
        yield event


async def _generate(context: HttpContext, job: Job, request: Request) -> Any:
    if not job.stream:
        return JSONResponse(await until_disconnected(request, _whole(context, job)))
    stream = MultiStream(context.engine, job.requests)
    try:
        await stream.open()      # refusals (400, 404, 429, 503) before any byte is sent
    except SUBMIT_ERRORS as error:
        raise errors.from_domain(error, job.model) from error
    writer = ChunkWriter(job, int(time.time()), TokenText(context.engine.encoder))
    return EventStreamResponse(_events(stream, writer, job), on_close=stream.close)


def _models(context: HttpContext) -> dict[str, Any]:
    base = {"id": context.model_id, "object": "model", "created": context.started, "owned_by": "deltaserve",
            "root": context.model_id, "parent": None, "max_model_len": context.max_model_len}
    adapters = [{**base, "id": name, "root": name, "parent": context.model_id} for name in context.adapter_names()]
    return {"object": "list", "data": [base, *adapters]}


def create_app(context: HttpContext) -> FastAPI:
    """The ASGI app over one engine; `context` says what it serves and who may call."""
    app = FastAPI(title="deltaserve OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
    errors.install(app)
    keyed = [Depends(_require_key(context))]

    @app.post("/v1/completions", dependencies=keyed)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await _generate(context, completion_job(body, context.model_id, context.max_top_logprobs), request)

    @app.post("/v1/chat/completions", dependencies=keyed)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        return await _generate(context, chat_job(body, context.model_id, context.max_top_logprobs), request)

    @app.get("/v1/models", dependencies=keyed)
    async def models() -> dict[str, Any]:
        return _models(context)

    @app.get("/v1/models/{model:path}", dependencies=keyed)
    async def model(model: str) -> dict[str, Any]:
        for entry in _models(context)["data"]:
            if entry["id"] == model:
                return entry
        raise errors.model_not_found(model)

    @app.get("/health")
    async def health() -> JSONResponse:
        serving = await context.healthy()
        return JSONResponse({"status": "SERVING" if serving else "NOT_SERVING"}, status_code=200 if serving else 503)

    if context.manager is not None:
        app.include_router(admin.router(context.manager, context.admin_token))
    return app

