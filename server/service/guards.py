"""Call-level guards for the deltaserve services: API keys on inference calls, malformed request bodies answered
with INVALID_ARGUMENT, and status messages kept short whatever they quote."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from server.security.keys import ApiKeys

log = logging.getLogger("deltaserve.service")

HandlerCall = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]
MAX_STATUS_MESSAGE = 1024   # characters; gRPC metadata limits are a few KiB, and people read these


def short_message(message: str, limit: int = MAX_STATUS_MESSAGE) -> str:
    """A status message no longer than `limit` characters (what quotes user input cuts it short already)."""
    return message if len(message) <= limit else message[: limit - 20] + f"... [{len(message)} chars]"


class _Malformed:
    """What a request body that is not a valid message of its type deserializes to."""


MALFORMED = _Malformed()


def _replace_behaviour(handler: grpc.RpcMethodHandler,
                       unary: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]],
                       stream: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]) -> grpc.RpcMethodHandler:
    """The handler with its unary-request behaviour replaced, keeping its kind (unary or server streaming)."""
    if handler.response_streaming:
        return handler._replace(unary_stream=stream)
    return handler._replace(unary_unary=unary)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls to the services in `protected` with UNAUTHENTICATED unless their metadata carries
    'authorization: Bearer <key>' with an accepted key; other services (health, reflection) stay open."""

    def __init__(self, keys: ApiKeys, protected: tuple[str, ...]) -> None:
        self._keys = keys
        self._prefixes = tuple(f"/{service}/" for service in protected)

    async def intercept_service(self, continuation: HandlerCall,
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self._prefixes) or handler.request_streaming:
            return handler
        if self._keys.allows(_metadata(details, "authorization")):
            return handler
        message = "this call needs the metadata 'authorization: Bearer <key>' with one of the server's API keys"

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # pragma: no cover - abort raises

        return _replace_behaviour(handler, refuse, refuse_stream)


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """A body that does not parse as the method's request message gets INVALID_ARGUMENT (gRPC itself answers
    UNKNOWN and logs an error); applies to the services in `guarded` (unary requests)."""

    def __init__(self, guarded: tuple[str, ...]) -> None:
        self._prefixes = tuple(f"/{service}/" for service in guarded)

    async def intercept_service(self, continuation: HandlerCall,
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        guarded = handler is not None and details.method.startswith(self._prefixes)
        if not guarded or handler.request_streaming or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer

        def tolerant(data: bytes) -> Any:
            try:
                return parse(data)
            except Exception:  # noqa: BLE001 - any parse failure is the caller's malformed body
                return MALFORMED

        unary, stream = handler.unary_unary, handler.unary_stream
        method = details.method

        async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if request is MALFORMED:
                await _refuse_malformed(context, method)
            return await unary(request, context)

        async def checked_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if request is MALFORMED:
                await _refuse_malformed(context, method)
            async for response in stream(request, context):
                yield response

        return _replace_behaviour(handler._replace(request_deserializer=tolerant), checked, checked_stream)


async def _refuse_malformed(context: grpc.aio.ServicerContext, method: str) -> None:
    log.info("malformed request body for %s refused", method)
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"the request body is not a valid {method.rsplit('/', 1)[-1]} request message")


def _metadata(details: grpc.HandlerCallDetails, key: str) -> str | None:
    for name, value in details.invocation_metadata or ():
        if name == key:
            return value.decode() if isinstance(value, bytes) else value
    return None
