"""Blocking client for the deltaserve Generation service."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from google.protobuf.json_format import MessageToDict
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.adapters import adapter_info_to_dict
from clients.channel import TlsOptions, bearer, open_channel, routing
from clients.messages import GenerationResult, StreamEvent, build_request, event_from_pb, result_from_pb
from deltaserve.v1 import adapters_pb2 as apb
from deltaserve.v1 import adapters_pb2_grpc as apb_grpc
from deltaserve.v1 import generation_pb2 as pb
from deltaserve.v1 import generation_pb2_grpc as pb_grpc

DEFAULT_TARGET = "localhost:50051"
Metadata = Sequence[tuple[str, str | bytes]]


class _StreamCall(Protocol):
    def __next__(self) -> pb.GenerateStreamResponse: ...

    def cancel(self) -> bool: ...


def model_info_to_dict(info: pb.ModelInfoResponse) -> dict[str, Any]:
    return MessageToDict(info, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def health_status_name(response: health_pb2.HealthCheckResponse) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


class GenerationStream:
    """Iterates a GenerateStream call: `TokenChunk` events, then the final `GenerationResult`.

    Closing it early (`close()`, leaving a `with` block, breaking out of a `for` loop over it, or
    dropping the last reference) cancels the RPC so the server frees the request.
    """

    def __init__(self, call: _StreamCall) -> None:
        self._call = call

    def __iter__(self) -> GenerationStream:
        return self

    def __next__(self) -> StreamEvent:
        return event_from_pb(next(self._call))

    def cancel(self) -> bool:
        """Cancels the RPC; False when it had already finished."""
        return self._call.cancel()

    def close(self) -> None:
        self.cancel()

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        call = getattr(self, "_call", None)
        if call is not None:
            call.cancel()


class DeltaClient:
    """Blocking deltaserve client over one gRPC channel; use it as a context manager to close the channel.

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
        self._channel = open_channel(target, tls)
        self._stub = pb_grpc.GenerationStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._adapters = apb_grpc.AdaptersStub(self._channel)

    def generate(
        self,
        prompt: str | None = None,
        **options: Any,
    ) -> GenerationResult:
        """Generates a completion and returns it whole. `options` are `build_request`'s keywords (messages,
        adapter, sampling and stopping); ValueError unless exactly one of `prompt` or `messages` is given."""
        request = build_request(prompt, **options)
        response = self._stub.Generate(request, timeout=self.timeout, metadata=self._routed(request))
        return result_from_pb(response)

    def generate_stream(
        self,
        prompt: str | None = None,
        **options: Any,
    ) -> GenerationStream:
        """Like `generate`, but yields `TokenChunk`s as they come and finally the `GenerationResult`."""
        request = build_request(prompt, **options)
        call = self._stub.GenerateStream(request, timeout=self.timeout, metadata=self._routed(request))
        return GenerationStream(call)

    def _routed(self, request: pb.GenerateRequest) -> tuple[tuple[str, str | bytes], ...]:
        return tuple(self.metadata) + routing(request.adapter_id, self.ray)

    def model_info(self) -> dict[str, Any]:
        """The served model, engine capacity and registered adapters, as a JSON-ready dict."""
        info = self._stub.ModelInfo(pb.ModelInfoRequest(), timeout=self.timeout, metadata=self.metadata)
        return model_info_to_dict(info)

    def health(self, service: str = "") -> str:
        """The standard gRPC health status name of `service` ("" is the whole server), e.g. "SERVING"."""
        request = health_pb2.HealthCheckRequest(service=service)
        return health_status_name(self._health.Check(request, timeout=self.timeout, metadata=self.metadata))

    # --- the Adapters admin service: each returns the adapter(s) as JSON-ready dicts ---

    def load_adapter(self, name: str, path: str, *, pinned: bool = False) -> dict[str, Any]:
        """Loads (or reloads, as a new version) the adapter directory `path` on the server as `name`."""
        request = apb.LoadAdapterRequest(name=name, path=path, pinned=pinned)
        response = self._adapters.LoadAdapter(request, timeout=self.timeout, metadata=self._admin_metadata)
        return adapter_info_to_dict(response.adapter)

    def unload_adapter(self, name: str) -> dict[str, Any]:
        """Stops serving `name`; its state says "unloading" while in-flight requests still run on it."""
        request = apb.UnloadAdapterRequest(name=name)
        response = self._adapters.UnloadAdapter(request, timeout=self.timeout, metadata=self._admin_metadata)
        return adapter_info_to_dict(response.adapter)

    def list_adapters(self) -> list[dict[str, Any]]:
        response = self._adapters.ListAdapters(apb.ListAdaptersRequest(), timeout=self.timeout,
                                               metadata=self._admin_metadata)
        return [adapter_info_to_dict(info) for info in response.adapters]

    def get_adapter(self, name: str) -> dict[str, Any]:
        response = self._adapters.GetAdapter(apb.GetAdapterRequest(name=name), timeout=self.timeout,
                                             metadata=self._admin_metadata)
        return adapter_info_to_dict(response.adapter)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> DeltaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
