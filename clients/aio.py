"""asyncio client for the deltaserve Generation service, with the same surface as `DeltaClient`."""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.adapters import adapter_info_to_dict
from clients.channel import TlsOptions, bearer, open_aio_channel, routing
from clients.client import DEFAULT_TARGET, Metadata, health_status_name, model_info_to_dict
from clients.messages import GenerationResult, StreamEvent, build_request, event_from_pb, result_from_pb
from deltaserve.v1 import adapters_pb2 as apb
from deltaserve.v1 import adapters_pb2_grpc as apb_grpc
from deltaserve.v1 import generation_pb2 as pb
from deltaserve.v1 import generation_pb2_grpc as pb_grpc


class AsyncGenerationStream:
    """Async-iterates a GenerateStream call: `TokenChunk` events, then the final `GenerationResult`.

    Closing it early (`aclose()`, leaving an `async with` block, breaking out of an `async for` loop
    over it, or dropping the last reference) cancels the RPC so the server frees the request.
    """

    def __init__(self, call: grpc.aio.UnaryStreamCall) -> None:
        self._call = call

    def __aiter__(self) -> AsyncGenerationStream:
        return self

    async def __anext__(self) -> StreamEvent:
        message = await self._call.read()
        if message is grpc.aio.EOF:
            raise StopAsyncIteration
        return event_from_pb(message)

    def cancel(self) -> bool:
        """Cancels the RPC; False when it had already finished."""
        return self._call.cancel()

    async def aclose(self) -> None:
        self.cancel()

    async def __aenter__(self) -> AsyncGenerationStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # An `async for` that breaks drops the stream at once; cancelling here (not in a finalizer task
        # scheduled later, as for async generators) frees the server's request immediately.
        call = getattr(self, "_call", None)
        if call is not None and not call.done():
            call.cancel()


class AsyncDeltaClient:
    """asyncio deltaserve client over one gRPC channel; create it inside the event loop that uses it,
    and use it as an async context manager to close the channel.

    `timeout` (seconds) is the deadline of every call (for a stream, of the whole stream); `metadata`
    (key, value) pairs are sent with every call; `api_key` with the inference calls, `admin_token` with the adapter
    admin calls; `tls` makes it a TLS channel (mutual TLS with a client certificate); `ray` adds the
    `multiplexed_model_id` metadata (the request's adapter) that Ray Serve routes on (docs/scale-out.md).
    """

    def __init__(self, target: str = DEFAULT_TARGET, timeout: float | None = None, metadata: Metadata = (),
                 admin_token: str | None = None, api_key: str | None = None, tls: TlsOptions | None = None,
                 ray: bool = False) -> None:
        self.target = target
        self.timeout = timeout
        self._admin_metadata = tuple(metadata) + bearer(admin_token)
        self.metadata = tuple(metadata) + bearer(api_key)
        self.ray = ray
        self._channel = open_aio_channel(target, tls)
        self._stub = pb_grpc.GenerationStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._adapters = apb_grpc.AdaptersStub(self._channel)

    async def generate(
        self,
        prompt: str | None = None,
        **options: Any,
    ) -> GenerationResult:
        """Generates a completion and returns it whole. `options` are `build_request`'s keywords (messages,
        adapter, sampling and stopping); ValueError unless exactly one of `prompt` or `messages` is given."""
        request = build_request(prompt, **options)
        response = await self._stub.Generate(request, timeout=self.timeout, metadata=self._routed(request))
        return result_from_pb(response)

    def generate_stream(
        self,
        prompt: str | None = None,
        **options: Any,
    ) -> AsyncGenerationStream:
        """Like `generate`, but async-yields `TokenChunk`s as they come and finally the `GenerationResult`."""
        request = build_request(prompt, **options)
        call = self._stub.GenerateStream(request, timeout=self.timeout, metadata=self._routed(request))
        return AsyncGenerationStream(call)

    def _routed(self, request: pb.GenerateRequest) -> tuple[tuple[str, str | bytes], ...]:
        return tuple(self.metadata) + routing(request.adapter_id, self.ray)

    async def model_info(self) -> dict[str, Any]:
        """The served model, engine capacity and registered adapters, as a JSON-ready dict."""
        info = await self._stub.ModelInfo(pb.ModelInfoRequest(), timeout=self.timeout, metadata=self.metadata)
        return model_info_to_dict(info)

    async def health(self, service: str = "") -> str:
        """The standard gRPC health status name of `service` ("" is the whole server), e.g. "SERVING"."""
        request = health_pb2.HealthCheckRequest(service=service)
        response = await self._health.Check(request, timeout=self.timeout, metadata=self.metadata)
        return health_status_name(response)

    # --- the Adapters admin service (see DeltaClient) ---

    async def load_adapter(self, name: str, path: str, *, pinned: bool = False) -> dict[str, Any]:
        request = apb.LoadAdapterRequest(name=name, path=path, pinned=pinned)
        response = await self._adapters.LoadAdapter(request, timeout=self.timeout, metadata=self._admin_metadata)
        return adapter_info_to_dict(response.adapter)

    async def unload_adapter(self, name: str) -> dict[str, Any]:
        request = apb.UnloadAdapterRequest(name=name)
        response = await self._adapters.UnloadAdapter(request, timeout=self.timeout, metadata=self._admin_metadata)
        return adapter_info_to_dict(response.adapter)

    async def list_adapters(self) -> list[dict[str, Any]]:
        response = await self._adapters.ListAdapters(apb.ListAdaptersRequest(), timeout=self.timeout,
                                                     metadata=self._admin_metadata)
        return [adapter_info_to_dict(info) for info in response.adapters]

    async def get_adapter(self, name: str) -> dict[str, Any]:
        response = await self._adapters.GetAdapter(apb.GetAdapterRequest(name=name), timeout=self.timeout,
                                                   metadata=self._admin_metadata)
        return adapter_info_to_dict(response.adapter)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncDeltaClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
