"""TLS material from PEM files, re-read when the files change (certificate rotation without a restart)."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("deltaserve.security")


@dataclass(frozen=True)
class PemBundle:
    """The server's certificate chain and key, and the CA bundle client certificates must chain to (if any)."""

    cert_chain: bytes = b""
    private_key: bytes = b""
    client_ca: bytes | None = None

    def __repr__(self) -> str:   # the private key never reaches a log line
        return f"PemBundle(cert {len(self.cert_chain)} bytes, key hidden, client CA {bool(self.client_ca)})"


class CertificateFiles:
    """Reads --tls-cert, --tls-key and --tls-client-ca, and tells when they have changed since the last read."""

    def __init__(self, cert: str, key: str, client_ca: str = "") -> None:
        self.cert, self.key, self.client_ca = Path(cert), Path(key), Path(client_ca) if client_ca else None
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self.current = self._read()

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def _paths(self) -> list[Path]:
        return [p for p in (self.cert, self.key, self.client_ca) if p is not None]

    def _stat(self) -> tuple[tuple[int, int], ...]:
        return tuple((s.st_mtime_ns, s.st_size) for s in (p.stat() for p in self._paths()))

    def _read(self) -> PemBundle:
        ca = self.client_ca.read_bytes() if self.client_ca else None
        bundle = PemBundle(self.cert.read_bytes(), self.key.read_bytes(), ca)
        if b"-----BEGIN" not in bundle.cert_chain or b"-----BEGIN" not in bundle.private_key:
            raise ValueError(f"{self.cert} and {self.key} must be PEM files (a certificate chain and its key)")
        return bundle

    def reload_if_changed(self) -> PemBundle | None:
        """The new bundle when a file changed since the last read (None otherwise, or while a rotation is half
        written: the old bundle keeps serving and the next call tries again)."""
        with self._lock:
            try:
                stamp = self._stat()
                if stamp == self._stamp:
                    return None
                bundle = self._read()
            except (OSError, ValueError) as error:
                log.warning("TLS files changed but cannot be read yet (%s); still serving the previous certificate",
                            error)
                return None
            self._stamp, self.current = stamp, bundle
            log.info("TLS certificate files changed: serving the new certificate to new connections")
            return bundle
