"""`deltaserve serve`: load, listen, warm up, report SERVING, run until a signal."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from dataclasses import dataclass

from grpc_health.v1 import health_pb2

from deltaserve.v1 import generation_pb2 as pb
from server.app import ServingStack, build_stack, load
from server.config import ServerConfig
from server.engine.engine import Engine
from server.engine.request import GenerationRequest
from server.http.app import HttpContext, create_app
from server.http.server import HttpServer
from server.metrics import ServerMetrics
from server.security.keys import ApiKeys
from server.security.tls import CertificateFiles
from server.service.server import (
    RunningServer,
    Security,
    install_signal_handlers,
    mark_serving,
    model_info_provider,
    start_server,
)

log = logging.getLogger("deltaserve")


def warm_up(engine: Engine) -> None:
    """One short generation, so the first real request does not pay for lazy initialisation."""
    import threading

    done = threading.Event()
    start = time.perf_counter()
    engine.submit(GenerationRequest("warmup", prompt="Hello", max_new_tokens=2),
                  lambda out: done.set() if out.finished else None)
    done.wait()
    log.info("warm-up took %.2fs", time.perf_counter() - start)


def adapter_summaries(stack: ServingStack) -> list[pb.AdapterSummary]:
    return [pb.AdapterSummary(id=name, format=adapter.format, methods=list(adapter.methods))
            for name, adapter in sorted(stack.store.adapters.items())]


@dataclass
class Serving:
    """A started server: the gRPC server over the stack, the OpenAI-compatible HTTP API and the metrics endpoint
    unless turned off."""

    grpc: RunningServer
    stack: ServingStack
    metrics: ServerMetrics | None
    http: HttpServer | None = None

    @property
    def port(self) -> int:
        return self.grpc.port

    @property
    def engine(self) -> Engine:
        return self.grpc.engine

    async def stop(self, grace: float) -> None:
        if self.http is not None:
            # Both APIs refuse new work at once (health NOT_SERVING, the engine refusing); HTTP requests in flight
            # then finish within the grace period before the engine shuts down in grpc.stop.
            deadline = time.monotonic() + grace
            await self.grpc.health.enter_graceful_shutdown()
            self.engine.stop_accepting()
            await self.http.stop(grace)
            grace = max(deadline - time.monotonic(), 0.0)
        await self.grpc.stop(grace)
        self.stack.adapters.stop()
        if self.metrics is not None:  # last: scrapes still see the drain
            self.metrics.stop()


async def start(config: ServerConfig) -> Serving:
    """Everything up to SERVING; returns the running server (used by tests and `serve`)."""
    loop = asyncio.get_running_loop()
    loaded = await loop.run_in_executor(None, load, config)
    metrics = ServerMetrics(config) if config.metrics_port >= 0 else None
    stack = await loop.run_in_executor(None, build_stack, loaded, config, metrics.loads if metrics else None)
    engine = stack.engine
    engine.start()
    info = model_info_provider(loaded, engine, lambda: adapter_summaries(stack))
    running = await start_server(engine, info, config.host, config.port, stack.adapters.manager,
                                 security=Security.from_config(config))
    if not config.admin_token:
        log.warning("the Adapters admin API is open to anyone who can reach port %d: set --admin-token "
                    "(or DELTASERVE_ADMIN_TOKEN) to require a bearer token", running.port)
    stack.adapters.start()
    try:
        http = await start_http(config, stack, running) if config.http_port >= 0 else None
    except OSError:
        await running.stop(0)
        raise
    if metrics is not None:
        metrics.attach(stack)
        try:
            metrics.serve()
        except OSError:
            if http is not None:
                await http.stop(0)
            await running.stop(0)
            raise
    if config.warmup:
        await loop.run_in_executor(None, warm_up, engine)
    # The model, tokenizer and libraries leave ~10^6 long-lived objects; a full collection walking them stalls
    # every thread for ~0.2 s (seen as a hiccup in running streams when adapter loads trigger one). Frozen
    # objects are never walked again.
    gc.collect()
    gc.freeze()
    if metrics is not None:  # after the warm-up, so its request is not counted
        engine.set_observer(metrics.observer)
    await mark_serving(running)
    log.info("SERVING %s on port %d", loaded.model_id, running.port)
    return Serving(running, stack, metrics, http)


async def start_http(config: ServerConfig, stack: ServingStack, running: RunningServer) -> HttpServer:
    """The OpenAI-compatible API over the same engine; its /health follows the gRPC health status."""
    async def healthy() -> bool:
        reply = await running.health.Check(health_pb2.HealthCheckRequest(service=""), None)
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    context = HttpContext(
        engine=stack.engine, model_id=stack.loaded.model_id, adapter_names=stack.store.names, healthy=healthy,
        api_keys=ApiKeys.from_config(config.api_key, config.api_key_file), admin_token=config.admin_token,
        manager=stack.adapters.manager, max_top_logprobs=config.max_top_logprobs,
        max_model_len=stack.engine.limits.max_model_len)
    tls = CertificateFiles(config.tls_cert, config.tls_key, config.tls_client_ca) if config.tls_cert else None
    http = HttpServer(create_app(context), config.http_host or config.host, config.http_port, tls)
    await http.start()
    return http


async def serve(config: ServerConfig) -> int:
    stop = asyncio.Event()
    install_signal_handlers(stop)
    running = await start(config)
    await stop.wait()
    await running.stop(config.grace_period)
    return 0
