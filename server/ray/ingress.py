"""The application's ingress: the deltaserve.v1 gRPC methods (behind Ray's gRPC proxy) and the OpenAI HTTP API
(behind Ray's HTTP proxy), each request sent to the engine deployment with its adapter as the multiplexed model
id, so Ray routes it to a replica that holds the adapter. Stock clients need nothing extra."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from deltaserve.v1 import generation_pb2 as pb
from server.http.errors import ApiError
from server.http.responses import DONE, sse
from server.http.translate import resolve_model
from server.ray import retry
from server.ray.asgi import portable_scope
from server.ray.calls import ReplicaAbort, cause
from server.ray.settings import RayAppSettings
from server.security.keys import ApiKeys
from server.service.server import GENERATION_SERVICE

log = logging.getLogger("deltaserve.ray")
GENERATE_PATHS = ("/v1/completions", "/v1/chat/completions")
HEALTH_TIMEOUT_S = 5.0
NEEDS_KEY = "this call needs the metadata 'authorization: Bearer <key>' with one of the server's API keys"


def _fail(context: Any, error: BaseException) -> None:
    """Sets the gRPC status a failed call ends with; errors that are not ours go on to Ray's proxy."""
    reason = cause(error)
    if isinstance(reason, ReplicaAbort):
        context.set_code(reason.status)
        context.set_details(reason.details)
    elif isinstance(reason, retry.ReplicaLost):
        context.set_code(grpc.StatusCode.UNAVAILABLE)
        context.set_details(str(reason))
    else:
        raise error


class StreamFailed(Exception):
    """Ends a failed stream: Ray's proxy reads a stream's status from the context only when the method raises."""


@serve.deployment(name="DeltaIngress", max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
class DeltaIngress:
    """Routes each request by its adapter: gRPC `adapter_id`, HTTP `model`; sends it again when the replica
    serving it dies before an answer went out."""

    def __init__(self, engine: DeploymentHandle, args: dict[str, Any]) -> None:
        settings = RayAppSettings.from_args(args)
        config = settings.server_config()
        self.engine = engine
        self.failover = retry.Failover(settings.replica_retries)
        self.keys = ApiKeys.from_config(config.api_key, config.api_key_file)   # HTTP: the replica's app checks
        self._base_id = ""

    def _to(self, adapter: str, streaming: bool = False) -> DeploymentHandle:
        return self.engine.options(multiplexed_model_id=adapter, stream=streaming)

    def _adapter(self, request: pb.GenerateRequest, grpc_context: Any) -> str:
        """The adapter a gRPC request names, once its API key is checked; the `multiplexed_model_id` metadata,
        when a client sends it, must agree (a mismatch would defeat the routing)."""
        self._check_key(grpc_context)
        routed = serve.get_multiplexed_model_id()
        if routed and routed != request.adapter_id:
            raise ReplicaAbort("INVALID_ARGUMENT", f"metadata multiplexed_model_id {routed[:128]!r} differs from "
                               f"adapter_id {request.adapter_id[:128]!r}")
        return request.adapter_id

    async def Generate(self, request: pb.GenerateRequest, grpc_context: Any) -> pb.GenerateResponse:  # noqa: N802
        try:
            adapter = self._adapter(request, grpc_context)
            return await self.failover.call(lambda: self._to(adapter).generate.remote(request))
        except Exception as error:
            _fail(grpc_context, error)
            return pb.GenerateResponse()

    async def GenerateStream(self, request: pb.GenerateRequest,  # noqa: N802
                             grpc_context: Any) -> AsyncIterator[pb.GenerateStreamResponse]:
        messages = None
        try:
            adapter = self._adapter(request, grpc_context)
            messages = self.failover.stream(lambda: self._to(adapter, True).generate_stream.remote(request))
            async for message in messages:
                yield message
        except Exception as error:
            _fail(grpc_context, error)
            raise StreamFailed(grpc_context.details()) from None
        finally:   # a cancelled call cancels the replica's work now
            if messages is not None:
                await messages.aclose()

    async def ModelInfo(self, request: pb.ModelInfoRequest, grpc_context: Any) -> pb.ModelInfoResponse:  # noqa: N802
        try:
            self._check_key(grpc_context)
        except ReplicaAbort as error:
            _fail(grpc_context, error)
            return pb.ModelInfoResponse()
        return await self.failover.call(lambda: self._to("").model_info.remote())

    def _check_key(self, grpc_context: Any) -> None:
        if self.keys.required:
            metadata = dict(grpc_context.invocation_metadata())
            if not self.keys.allows(metadata.get("authorization")):
                raise ReplicaAbort("UNAUTHENTICATED", NEEDS_KEY)

    async def Check(self, request: health_pb2.HealthCheckRequest,  # noqa: N802
                    grpc_context: Any) -> health_pb2.HealthCheckResponse:
        """grpc.health.v1: SERVING when an engine replica answers."""
        if request.service not in ("", GENERATION_SERVICE):
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"unknown service {request.service[:128]!r}")
            return health_pb2.HealthCheckResponse()
        async def ask() -> str:
            return await self._to("").base_model_id.remote()

        try:   # a replica answers now (a call with no replica running would wait for one)
            await asyncio.wait_for(ask(), HEALTH_TIMEOUT_S)
        except Exception as error:  # no replica running (yet): that is what NOT_SERVING says
            log.info("health check: %s", error)
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def __call__(self, request: Request) -> Response:
        """The OpenAI API: the whole body is read here, `model` names the adapter, the replica's app answers."""
        body = await request.body()
        scope = portable_scope(request.scope)
        fields = _json_fields(scope, body)
        adapter = resolve_model(str(fields.get("model", "")), await self._base_model_id()) if fields else ""
        handle = self._to(adapter, True)
        if fields.get("stream") is True:
            return await _streamed(self.failover.stream(lambda: handle.http.remote(scope, body)))
        try:
            messages = await self.failover.call(lambda: _collect(handle.http.remote(scope, body)))
        except retry.ReplicaLost as error:
            return _lost(error)
        start = messages[0]
        response = Response(b"".join(m.get("body", b"") for m in messages[1:]), status_code=start["status"])
        response.raw_headers = list(start.get("headers", []))
        return response

    def stats(self) -> dict[str, int]:
        """How often a replica died under a request: sent again, lost mid-stream, given up."""
        return self.failover.counts()

    async def _base_model_id(self) -> str:
        if not self._base_id:
            self._base_id = await self.failover.call(lambda: self._to("").base_model_id.remote())
        return self._base_id


def _json_fields(scope: dict[str, Any], body: bytes) -> dict[str, Any]:
    """The generation request's JSON object ({} for other routes or a body that is not one: the app refuses it)."""
    if scope.get("method") != "POST" or scope.get("path", "").rstrip("/") not in GENERATE_PATHS:
        return {}
    try:
        fields = json.loads(body)
    except ValueError:
        return {}
    return fields if isinstance(fields, dict) else {}


async def _collect(messages: AsyncIterator[dict[str, Any]]) -> list[dict[str, Any]]:
    return [message async for message in messages]


def _lost(error: Exception) -> Response:
    body = ApiError(503, str(error), "server_error", code="replica_lost").body()
    return Response(json.dumps(body), status_code=503, media_type="application/json")


async def _streamed(messages: AsyncGenerator[dict[str, Any], None]) -> Response:
    """A streamed answer: the status and headers once the replica started it, then its events as they come; a
    replica lost mid-stream ends it with an error event (what OpenAI's clients read after the headers)."""
    try:
        start = await anext(messages)
    except retry.ReplicaLost as error:
        return _lost(error)

    async def events() -> AsyncIterator[bytes]:
        try:
            async for message in messages:
                if message.get("body"):
                    yield message["body"]
        except retry.ReplicaLost as error:
            yield sse(ApiError(503, str(error), "server_error", code="replica_lost").body())
            yield DONE
        finally:   # the client went away: cancel the replica's work now, not when this is garbage collected
            await messages.aclose()

    response = StreamingResponse(events(), status_code=start["status"])
    response.raw_headers = list(start.get("headers", []))
    return response
