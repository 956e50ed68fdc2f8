"""The engine deployment: one deltaserve engine per replica (one device), serving many concurrent requests of
many adapters in one batch. Its callers are the ingress (gRPC and HTTP) and operators (`stats`)."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray import serve
from starlette.types import Message

from deltaserve.v1 import generation_pb2 as pb
from server.app import build_stack, load
from server.config import ServerConfig, env_name
from server.engine.errors import InvalidRequest, UnknownAdapter
from server.http.app import HttpContext, create_app
from server.ray.asgi import run_asgi
from server.ray.calls import AbortContext
from server.ray.residency import ReplicaAdapters
from server.ray.settings import RayAppSettings
from server.security.keys import ApiKeys
from server.serve import adapter_summaries, warm_up
from server.service.generation import GenerationService, abort_with
from server.service.server import model_info_provider

log = logging.getLogger("deltaserve.ray")


def replica_config(settings: RayAppSettings) -> ServerConfig:
    """The engine's configuration; unless the settings or DELTASERVE_THREADS say, its torch threads are the CPUs
    Ray gave this replica (`ray_actor_options.num_cpus`), not every core of the node."""
    config = settings.server_config()
    cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 0))
    if cpus > 0 and "threads" not in settings.engine and env_name("threads") not in os.environ:
        config = dataclasses.replace(config, threads=cpus)
    return config


@serve.deployment(name="DeltaEngine", max_ongoing_requests=64, health_check_period_s=2, health_check_timeout_s=30,
                  graceful_shutdown_timeout_s=10)
class DeltaEngine:
    """A replica: the model, the engine and the adapters resident here (an adapter id is a multiplexed model id).

    `generate`, `generate_stream` and `model_info` run the single-node gRPC servicer (server/service/generation.py);
    `http` runs the single-node OpenAI ASGI app (server/http/app.py) for one request."""

    def __init__(self, args: dict[str, Any]) -> None:
        settings = RayAppSettings.from_args(args)
        config = replica_config(settings)
        self.threads = config.threads
        loaded = load(config)
        self.stack = build_stack(loaded, config)
        engine = self.stack.engine
        engine.start()
        if config.warmup:
            warm_up(engine)
        self.adapters = ReplicaAdapters(self.stack.adapters.manager, settings.adapters_store,
                                        settings.max_adapters_per_replica)
        self.model_id = loaded.model_id
        info = model_info_provider(loaded, engine, lambda: adapter_summaries(self.stack))
        self.service = GenerationService(engine, info)

        async def healthy() -> bool:
            return True

        self.app = create_app(HttpContext(
            engine=engine, model_id=loaded.model_id, adapter_names=settings.store_names, healthy=healthy,
            api_keys=ApiKeys.from_config(config.api_key, config.api_key_file), manager=None,
            max_top_logprobs=config.max_top_logprobs, max_model_len=engine.limits.max_model_len))
        log.info("replica pid %d serving %s on %s", os.getpid(), loaded.model_id, loaded.device)

    async def generate(self, request: pb.GenerateRequest) -> pb.GenerateResponse:
        context = AbortContext()
        try:
            async with self.adapters.holding(self._adapter(request)):
                return await self.service.Generate(request, context)
        except (InvalidRequest, UnknownAdapter) as error:  # from `holding`: the servicer aborts by itself
            await abort_with(context, error)
            raise

    async def generate_stream(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateStreamResponse]:
        context = AbortContext()
        try:
            async with self.adapters.holding(self._adapter(request)):
                async for message in self.service.GenerateStream(request, context):
                    yield message
        except (InvalidRequest, UnknownAdapter) as error:
            await abort_with(context, error)

    async def model_info(self) -> pb.ModelInfoResponse:
        return self.service.model_info()

    async def http(self, scope: dict[str, Any], body: bytes) -> AsyncIterator[Message]:
        """One OpenAI API request; the ingress named its adapter as the multiplexed model id. An adapter the store
        does not hold is left to the app, which answers 404 as on one node."""
        adapter = serve.get_multiplexed_model_id()
        try:
            self.adapters.check(adapter)
        except (InvalidRequest, UnknownAdapter):
            adapter = ""
        async with self.adapters.holding(adapter):
            async for message in run_asgi(self.app, scope, body):
                yield message

    def base_model_id(self) -> str:
        return self.model_id

    def stats(self) -> dict[str, Any]:
        """Where requests ran: this replica's id and pid, adapter loads and evictions, the adapters resident for
        Ray and registered in the engine, requests per adapter id, engine steps run so far."""
        context = serve.get_replica_context()
        return {"replica": context.replica_id.unique_id, "pid": os.getpid(), "loads": self.adapters.loads,
                "evictions": self.adapters.evictions, "resident": self.adapters.resident(), "threads": self.threads,
                "registered": sorted(self.stack.store.names()), "requests": dict(self.adapters.requests),
                "steps": self.stack.engine.stats().steps}

    def _adapter(self, request: pb.GenerateRequest) -> str:
        routed = serve.get_multiplexed_model_id()
        if routed and routed != request.adapter_id:
            raise InvalidRequest(f"the request was routed for adapter {routed!r} but names {request.adapter_id!r}")
        return request.adapter_id

    def __del__(self) -> None:
        stack, self.stack = getattr(self, "stack", None), None
        if stack is not None:
            stack.engine.stop_accepting()
            stack.engine.shutdown(0.0)
            stack.adapters.stop()
