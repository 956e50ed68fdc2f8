"""gRPC server credentials over the TLS files, re-read for each new connection when the files changed."""

from __future__ import annotations

import grpc

from server.security.tls import CertificateFiles, PemBundle


def _configuration(bundle: PemBundle) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([(bundle.private_key, bundle.cert_chain)],
                                                     root_certificates=bundle.client_ca)


def server_credentials(files: CertificateFiles) -> grpc.ServerCredentials:
    """TLS (mutual when a client CA is configured: a client without a certificate signed by it is refused in the
    handshake). gRPC asks the fetcher at each new connection; it answers a new configuration only after a change."""

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        bundle = files.reload_if_changed()
        return _configuration(bundle) if bundle is not None else None

    return grpc.dynamic_ssl_server_credentials(_configuration(files.current), fetch,
                                               require_client_authentication=files.mutual)
