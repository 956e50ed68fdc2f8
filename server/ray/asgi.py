"""Runs the OpenAI ASGI app for one buffered HTTP request inside a replica, as a stream of ASGI messages.

The ingress holds the client's connection; it sends the request's scope (the picklable part) and body through a
streaming handle and relays the messages back, so the app is mounted unchanged in the replica."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from starlette.types import ASGIApp, Message

# The scope keys that travel; the rest (state, app, extensions, the server's objects) belong to the ingress.
SCOPE_KEYS = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "query_string", "headers",
              "server", "client")
# How long a disconnected request's app gets to release its engine requests before it is cancelled.
DISCONNECT_GRACE_S = 5.0


def portable_scope(scope: dict[str, Any]) -> dict[str, Any]:
    """The HTTP scope as the replica's app sees it: as received, from the root path."""
    portable = {key: scope[key] for key in SCOPE_KEYS if key in scope}
    portable["headers"] = [(bytes(k), bytes(v)) for k, v in scope.get("headers", [])]
    portable["root_path"] = ""
    portable["path"] = scope.get("root_path", "") + scope.get("path", "/")
    portable["raw_path"] = portable["path"].encode()
    return portable


async def run_asgi(app: ASGIApp, scope: dict[str, Any], body: bytes) -> AsyncIterator[Message]:
    """Yields the app's messages (http.response.start, then http.response.body chunks). If the consumer goes
    away (the ingress's client disconnected, Ray cancels this generator), the app sees http.disconnect."""
    messages: asyncio.Queue[Message | None] = asyncio.Queue()
    disconnected = asyncio.Event()
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        messages.put_nowait(message)

    task = asyncio.ensure_future(app(dict(scope), receive, send))
    task.add_done_callback(lambda _: messages.put_nowait(None))
    try:
        while (message := await messages.get()) is not None:
            yield message
        await task  # the app's own failure, if it had one
    finally:
        disconnected.set()
        if not task.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), DISCONNECT_GRACE_S)
            task.cancel()
