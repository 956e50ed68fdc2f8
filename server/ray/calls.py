"""What crosses a deployment handle besides protobuf messages: a gRPC status raised in a replica."""

from __future__ import annotations

from typing import NoReturn

import grpc


class ReplicaAbort(Exception):
    """A gRPC status the engine replica chose (NOT_FOUND, INVALID_ARGUMENT, ...): the ingress sets it on the call.

    Picklable (code by name), so it crosses Ray's handle; Ray wraps it in a RayTaskError that is also an instance
    of this class."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(code, details)
        self.code = code
        self.details = details

    @property
    def status(self) -> grpc.StatusCode:
        return grpc.StatusCode[self.code]


class AbortContext:
    """The part of grpc.aio.ServicerContext that server/service/generation.py uses, for calling its servicer in a
    replica: `abort` raises ReplicaAbort instead of ending an RPC."""

    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        raise ReplicaAbort(code.name, details)


def cause(error: BaseException) -> BaseException:
    """The replica's own exception inside Ray's RayTaskError (the error itself when it is not wrapped)."""
    return getattr(error, "cause", None) or error
