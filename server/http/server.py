"""uvicorn inside the server process: a task on the gRPC server's event loop, on a socket bound here (so port 0
picks a free port and a busy port fails start-up at once)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI

from server.security.tls import CertificateFiles

log = logging.getLogger("deltaserve.http")


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers: `deltaserve serve` owns SIGTERM/SIGINT and stops it in order."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on host:port (IPv4 or IPv6, as the host says)."""
    family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise OSError(f"could not listen on {host}:{port} for the HTTP API: {error}") from error
    return sock


class HttpServer:
    """The OpenAI-compatible API on its own port; `start` returns once it accepts connections."""

    def __init__(self, app: FastAPI, host: str, port: int, tls: CertificateFiles | None = None) -> None:
        self.host = host
        self._socket = bind(host, port)
        self.port: int = self._socket.getsockname()[1]
        self._tls = tls
        secure = {}
        if tls is not None:   # mutual TLS: a client without a certificate signed by the CA fails the handshake
            secure = {"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key),
                      "ssl_ca_certs": str(tls.client_ca) if tls.client_ca else None,
                      "ssl_cert_reqs": ssl.CERT_REQUIRED if tls.mutual else ssl.CERT_NONE}
        config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="off",
                                ws="none", timeout_graceful_shutdown=None, **secure)
        self._server = _EmbeddedServer(config)
        self._task: asyncio.Task[None] | None = None
        self._rotation: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0", "::") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self._tls else 'http'}://{host}:{self.port}"

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]), name="deltaserve-http")
        while not self._server.started:
            if self._task.done():
                self._task.result()       # raises what stopped it
                raise OSError(f"the HTTP API on port {self.port} stopped during start-up")
            await asyncio.sleep(0.01)
        if self._tls is not None:
            self._rotation = asyncio.create_task(self._follow_rotation(self._tls), name="deltaserve-http-tls")
        log.info("OpenAI-compatible HTTP API on %s/v1", self.url)

    async def _follow_rotation(self, tls: CertificateFiles, interval: float = 1.0) -> None:
        """Loads a changed certificate into the live SSL context: new connections get it, open ones keep theirs."""
        while True:
            await asyncio.sleep(interval)
            if tls.reload_if_changed() is None:
                continue
            try:
                self._server.config.ssl.load_cert_chain(str(tls.cert), str(tls.key))
            except (ssl.SSLError, OSError) as error:
                log.warning("the rotated TLS certificate cannot be used (%s); still serving the previous one", error)

    async def stop(self, grace: float) -> None:
        """Stops accepting connections; requests in flight get `grace` seconds, then are cancelled (which
        cancels their engine requests)."""
        if self._rotation is not None:
            self._rotation.cancel()
        if self._task is None:
            self._socket.close()
            return
        self._server.config.timeout_graceful_shutdown = max(grace, 0.0)
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._socket.close()
