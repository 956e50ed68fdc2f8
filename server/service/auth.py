"""Bearer-token check for the admin service; every other service (Generation, health, reflection) stays open."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

HandlerCall = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]]


class AdminAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls to the services in `protected` with UNAUTHENTICATED unless they carry the metadata
    `authorization: Bearer <token>` (compared in constant time)."""

    def __init__(self, token: str, protected: tuple[str, ...]) -> None:
        self._expected = f"Bearer {token}".encode()
        self._prefixes = tuple(f"/{service}/" for service in protected)
        self._deny = grpc.unary_unary_rpc_method_handler(self._refuse)

    async def intercept_service(self, continuation: HandlerCall,
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        if not details.method.startswith(self._prefixes) or self._authorized(details.invocation_metadata):
            return await continuation(details)
        return self._deny

    def _authorized(self, metadata: Any) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                given = value if isinstance(value, bytes) else value.encode()
                return hmac.compare_digest(given, self._expected)
        return False

    @staticmethod
    async def _refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "this admin call needs the metadata "
                            "'authorization: Bearer <token>' with the server's --admin-token")
