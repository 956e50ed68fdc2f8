"""How a client reaches the server: a plaintext or TLS channel (mutual TLS with a client certificate) and the
API key its inference calls carry."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import grpc

TLS_CA_ENV, TLS_CERT_ENV, TLS_KEY_ENV, API_KEY_ENV = ("DELTASERVE_TLS_CA", "DELTASERVE_TLS_CERT", "DELTASERVE_TLS_KEY",
                                                      "DELTASERVE_API_KEY")
RAY_ENV = "DELTASERVE_RAY"
# The gRPC metadata Ray Serve's proxy routes on: requests go to a replica that already holds this model (adapter).
MULTIPLEXED_MODEL_ID = "multiplexed_model_id"


@dataclass(frozen=True)
class TlsOptions:
    """PEM files: the CA that signed the server's certificate; a client certificate and key for mutual TLS."""

    ca: str = ""
    cert: str = ""
    key: str = ""

    @classmethod
    def from_env(cls) -> TlsOptions:
        return cls(os.environ.get(TLS_CA_ENV, ""), os.environ.get(TLS_CERT_ENV, ""), os.environ.get(TLS_KEY_ENV, ""))

    @property
    def enabled(self) -> bool:
        return bool(self.ca or self.cert)

    def credentials(self) -> grpc.ChannelCredentials:
        if bool(self.cert) != bool(self.key):
            raise ValueError("a client certificate and its key go together: give both or neither")

        def read(path: str) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return grpc.ssl_channel_credentials(root_certificates=read(self.ca), private_key=read(self.key),
                                            certificate_chain=read(self.cert))


def open_channel(target: str, tls: TlsOptions | None) -> grpc.Channel:
    return grpc.secure_channel(target, tls.credentials()) if tls and tls.enabled else grpc.insecure_channel(target)


def open_aio_channel(target: str, tls: TlsOptions | None) -> grpc.aio.Channel:
    if tls and tls.enabled:
        return grpc.aio.secure_channel(target, tls.credentials())
    return grpc.aio.insecure_channel(target)


def bearer(secret: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata a call carries for a secret: `authorization: Bearer <secret>` when one is given."""
    return (("authorization", f"Bearer {secret}"),) if secret else ()


def ray_from_env() -> bool:
    return os.environ.get(RAY_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def routing(adapter_id: str, ray: bool) -> tuple[tuple[str, str], ...]:
    """The metadata that routes a request for `adapter_id` on Ray Serve (nothing for the base model, or off Ray)."""
    return ((MULTIPLEXED_MODEL_ID, adapter_id),) if ray and adapter_id else ()
