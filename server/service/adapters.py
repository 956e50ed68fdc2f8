"""The Adapters admin gRPC service: protobuf <-> AdapterManager calls, domain errors -> status codes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

import grpc

from adapters_store.errors import AdapterError, AdapterNotFound
from adapters_store.versions import AdapterState, Tier
from deltaserve.v1 import adapters_pb2 as pb
from deltaserve.v1 import adapters_pb2_grpc as pb_grpc
from server.adapters.errors import InvalidAdminRequest, PathNotAllowed, PinLimit
from server.adapters.manager import AdapterManager, AdapterStatus
from server.service.guards import short_message

STATUS_OF_ERROR: dict[type[Exception], grpc.StatusCode] = {
    AdapterNotFound: grpc.StatusCode.NOT_FOUND,
    PathNotAllowed: grpc.StatusCode.PERMISSION_DENIED,
    InvalidAdminRequest: grpc.StatusCode.INVALID_ARGUMENT,
    AdapterError: grpc.StatusCode.INVALID_ARGUMENT,
    PinLimit: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
ADMIN_ERRORS = tuple(STATUS_OF_ERROR)
STATES = {state: getattr(pb, f"ADAPTER_STATE_{state.name}") for state in AdapterState}
TIERS = {tier: getattr(pb, f"RESIDENCY_TIER_{tier.name}") for tier in Tier}
T = TypeVar("T")


def status_to_proto(status: AdapterStatus) -> pb.AdapterInfo:
    info = pb.AdapterInfo(
        name=status.name, state=STATES[status.state], version=status.version, path=status.path,
        source=status.source, pinned=status.pinned, format=status.format, methods=list(status.methods),
        ranks=list(status.ranks), targets=list(status.targets), parameter_count=status.num_parameters,
        bytes=status.nbytes, tier=TIERS[status.tier] if status.tier else pb.RESIDENCY_TIER_UNSPECIFIED,
        loaded_at=status.loaded_at, load_seconds=status.load_seconds, last_used=status.last_used,
        in_flight=status.in_flight, draining_versions=status.draining_versions,
        nonfinite_outputs=status.nonfinite_outputs)
    if status.error is not None:
        info.error.CopyFrom(pb.AdapterLoadError(reason=status.error.reason, message=status.error.message))
    return info


class AdaptersService(pb_grpc.AdaptersServicer):
    """LoadAdapter, UnloadAdapter, ListAdapters and GetAdapter; the work runs off the event loop."""

    def __init__(self, manager: AdapterManager) -> None:
        self.manager = manager

    async def _call(self, context: grpc.aio.ServicerContext, fn: Callable[..., T], *args: object) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
        except ADMIN_ERRORS as error:
            code = next(code for kind, code in STATUS_OF_ERROR.items() if isinstance(error, kind))
            await context.abort(code, short_message(str(error)))
            raise  # abort raises; this line only satisfies the type checker

    async def LoadAdapter(self, request: pb.LoadAdapterRequest,
                          context: grpc.aio.ServicerContext) -> pb.LoadAdapterResponse:
        status = await self._call(context, self.manager.load, request.name, request.path, request.pinned)
        return pb.LoadAdapterResponse(adapter=status_to_proto(status))

    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest,
                            context: grpc.aio.ServicerContext) -> pb.UnloadAdapterResponse:
        status = await self._call(context, self.manager.unload, request.name)
        return pb.UnloadAdapterResponse(adapter=status_to_proto(status))

    async def ListAdapters(self, request: pb.ListAdaptersRequest,
                           context: grpc.aio.ServicerContext) -> pb.ListAdaptersResponse:
        statuses = await self._call(context, self.manager.list)
        return pb.ListAdaptersResponse(adapters=[status_to_proto(s) for s in statuses])

    async def GetAdapter(self, request: pb.GetAdapterRequest,
                         context: grpc.aio.ServicerContext) -> pb.GetAdapterResponse:
        status = await self._call(context, self.manager.get, request.name)
        return pb.GetAdapterResponse(adapter=status_to_proto(status))
