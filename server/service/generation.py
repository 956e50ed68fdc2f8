"""The Generation gRPC service."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

import grpc

from deltaserve.v1 import generation_pb2 as pb
from deltaserve.v1 import generation_pb2_grpc as pb_grpc
from server.engine.engine import Engine
from server.engine.errors import InvalidRequest, Overloaded, ShuttingDown, UnknownAdapter, UntrustedOutput
from server.service.convert import request_from_proto, result_to_proto
from server.service.guards import short_message
from server.service.stream import EngineStream

log = logging.getLogger("deltaserve.service")

STATUS_OF_ERROR: dict[type[Exception], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    UnknownAdapter: grpc.StatusCode.NOT_FOUND,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    UntrustedOutput: grpc.StatusCode.INTERNAL,
}
DOMAIN_ERRORS = tuple(STATUS_OF_ERROR)


async def abort_with(context: grpc.aio.ServicerContext, error: Exception) -> None:
    code = next(code for kind, code in STATUS_OF_ERROR.items() if isinstance(error, kind))
    message = str(error.args[0]) if error.args else str(error)
    await context.abort(code, short_message(message))


class GenerationService(pb_grpc.GenerationServicer):
    """Generate, GenerateStream and ModelInfo over the engine."""

    def __init__(self, engine: Engine, model_info: Callable[[], pb.ModelInfoResponse]) -> None:
        self.engine = engine
        self.model_info = model_info

    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        try:
            domain = request_from_proto(request)
            async with EngineStream(self.engine, domain) as stream:
                async for out in stream.outputs():
                    if out.result is not None:
                        return result_to_proto(out.result)
        except DOMAIN_ERRORS as error:
            await abort_with(context, error)
        raise RuntimeError("the engine ended a request without a result")

    async def GenerateStream(self, request: pb.GenerateRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateStreamResponse]:
        try:
            domain = request_from_proto(request)
            async with EngineStream(self.engine, domain) as stream:
                async for out in stream.outputs():
                    if out.token_ids or out.text:
                        yield pb.GenerateStreamResponse(token=pb.TokenEvent(
                            token_ids=out.token_ids, text=out.text, logprobs=out.logprobs))
                    if out.result is not None:
                        yield pb.GenerateStreamResponse(final=result_to_proto(out.result))
        except DOMAIN_ERRORS as error:
            await abort_with(context, error)

    async def ModelInfo(self, request: pb.ModelInfoRequest,
                        context: grpc.aio.ServicerContext) -> pb.ModelInfoResponse:
        return self.model_info()
