"""The gRPC server: Generation, standard health checking and reflection, graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from deltaserve.v1 import adapters_pb2, adapters_pb2_grpc
from deltaserve.v1 import generation_pb2 as pb
from deltaserve.v1 import generation_pb2_grpc as pb_grpc
from server.adapters.manager import AdapterManager
from server.config import ServerConfig
from server.engine.engine import Engine
from server.model.loader import LoadedModel
from server.security.keys import ApiKeys
from server.security.tls import CertificateFiles
from server.service.adapters import AdaptersService
from server.service.auth import AdminAuthInterceptor
from server.service.generation import GenerationService
from server.service.guards import ApiKeyInterceptor, MalformedRequestInterceptor
from server.service.tls import server_credentials

log = logging.getLogger("deltaserve.service")

GENERATION_SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name
ADAPTERS_SERVICE = adapters_pb2.DESCRIPTOR.services_by_name["Adapters"].full_name
MAX_MESSAGE_BYTES = 64 * 2**20


@dataclass
class Security:
    """Who may call: API keys for inference, the admin token, TLS files (None: plaintext)."""

    api_keys: ApiKeys = field(default_factory=ApiKeys)
    admin_token: str = field(default="", repr=False)
    tls: CertificateFiles | None = None

    @classmethod
    def from_config(cls, config: ServerConfig) -> Security:
        tls = CertificateFiles(config.tls_cert, config.tls_key, config.tls_client_ca) if config.tls_cert else None
        return cls(ApiKeys.from_config(config.api_key, config.api_key_file), config.admin_token, tls)


@dataclass
class RunningServer:
    """A started gRPC server with the handles needed to stop it."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    engine: Engine
    port: int
    services: tuple[str, ...] = (GENERATION_SERVICE,)

    async def stop(self, grace: float) -> None:
        """NOT_SERVING at once, refuse new calls, let in-flight ones finish within `grace` seconds."""
        log.info("shutting down: in-flight requests get %.0f s", grace)
        await self.health.enter_graceful_shutdown()
        self.engine.stop_accepting()
        await self.server.stop(grace)
        await asyncio.get_running_loop().run_in_executor(None, self.engine.shutdown, 0.0)


def model_info_provider(loaded: LoadedModel, engine: Engine,
                        adapters: Callable[[], list[pb.AdapterSummary]]) -> Callable[[], pb.ModelInfoResponse]:
    def info() -> pb.ModelInfoResponse:
        stats = engine.stats()
        return pb.ModelInfoResponse(
            model_id=loaded.model_id,
            architecture=loaded.shape.architecture,
            dtype=str(loaded.dtype).removeprefix("torch."),
            device=str(loaded.device),
            max_context_length=engine.limits.max_model_len,
            vocab_size=loaded.shape.vocab_size,
            max_batch_size=stats.max_batch_size,
            max_waiting_requests=stats.max_waiting,
            kv_cache=pb.KvCacheInfo(block_size=stats.block_size, total_blocks=stats.total_blocks,
                                    free_blocks=stats.free_blocks, usage=stats.kv_usage),
            running_requests=stats.running,
            waiting_requests=stats.waiting,
            adapters=adapters(),
        )
    return info


async def start_server(engine: Engine, model_info: Callable[[], pb.ModelInfoResponse], host: str,
                       port: int, adapters: AdapterManager | None = None, admin_token: str = "",
                       security: Security | None = None) -> RunningServer:
    """Starts listening; health stays NOT_SERVING until `mark_serving`. With `adapters`, the Adapters admin
    service is served too, behind the admin token when one is given; inference calls need an API key when keys
    are configured; TLS when its files are."""
    security = security or Security(admin_token=admin_token)
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if security.api_keys.required:
        interceptors.append(ApiKeyInterceptor(security.api_keys, (GENERATION_SERVICE,)))
    if security.admin_token:
        interceptors.append(AdminAuthInterceptor(security.admin_token, (ADAPTERS_SERVICE,)))
    # Innermost: credentials are checked before a body is looked at.
    interceptors.append(MalformedRequestInterceptor((GENERATION_SERVICE, ADAPTERS_SERVICE)))
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)],
                             interceptors=interceptors)
    pb_grpc.add_GenerationServicer_to_server(GenerationService(engine, model_info), server)
    services = [GENERATION_SERVICE]
    if adapters is not None:
        adapters_pb2_grpc.add_AdaptersServicer_to_server(AdaptersService(adapters), server)
        services.append(ADAPTERS_SERVICE)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *services):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        (*services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    address = f"{host}:{port}"
    if security.tls is not None:
        bound = server.add_secure_port(address, server_credentials(security.tls))
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"could not listen on {host}:{port}")
    await server.start()
    log.info("listening on %s:%d (%s)", host, bound, "mutual TLS" if security.tls and security.tls.mutual else
             "TLS" if security.tls else "plaintext")
    return RunningServer(server, health_servicer, engine, bound, tuple(services))


async def mark_serving(running: RunningServer) -> None:
    for name in ("", *running.services):
        await running.health.set(name, health_pb2.HealthCheckResponse.SERVING)


def install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
