"""TLS on the OpenAI-compatible HTTP port (tiny model, real sockets): an HTTPS client that trusts the CA is served,
plaintext and wrong-CA clients are refused, mutual TLS refuses clients without a certificate from the CA, and a
rotated certificate is served to new connections without a restart."""

from __future__ import annotations

import os
import shutil
import socket
import ssl

import httpx
import pytest

from tests.certs import CertificateAuthority
from tests.helpers import ServerThread
from tests.hotload_helpers import wait_until


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki-http")
    ca, other = CertificateAuthority(root), CertificateAuthority(root, "other CA")
    return ca, other, ca.issue("server"), ca.issue("client", client=True)


def _served_serial(port: int, ca_file: str) -> int:
    context = ssl.create_default_context(cafile=ca_file)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            return int(tls.getpeercert()["serialNumber"], 16)


def _refused(call) -> bool:
    try:
        call()
    except (httpx.TransportError, ssl.SSLError, OSError):
        return True
    return False


def test_https_refusals_and_rotation(tiny_model_dir, cache_dir, pki, tmp_path):
    ca, other, issued, _ = pki
    cert, key = shutil.copy(issued.cert, tmp_path / "tls.pem"), shutil.copy(issued.key, tmp_path / "tls.key")
    with ServerThread(model=str(tiny_model_dir), cache_dir=cache_dir, device="cpu", tls_cert=str(cert),
                      tls_key=str(key), http_port=0) as server:
        port = server.running.http.port
        url = f"https://localhost:{port}"
        with httpx.Client(verify=ssl.create_default_context(cafile=str(ca.pem)), timeout=60) as client:
            assert client.get(f"{url}/health").status_code == 200
            models = client.get(f"{url}/v1/models").json()["data"]
            assert models and models[0]["id"]
        assert _refused(lambda: httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).raise_for_status())
        wrong = ssl.create_default_context(cafile=str(other.pem))
        assert _refused(lambda: httpx.get(f"{url}/health", verify=wrong, timeout=10))
        rotated = ca.issue("server-rotated")
        for src, dst in ((rotated.key, key), (rotated.cert, cert)):
            shutil.copy(src, tmp_path / "incoming")
            os.replace(tmp_path / "incoming", dst)
        wait_until(lambda: _served_serial(port, str(ca.pem)) == rotated.serial, timeout=60)
        with httpx.Client(verify=ssl.create_default_context(cafile=str(ca.pem)), timeout=60) as client:
            assert client.get(f"{url}/health").status_code == 200


def test_mutual_tls_on_http(tiny_model_dir, cache_dir, pki):
    ca, _, issued, client_cert = pki
    with ServerThread(model=str(tiny_model_dir), cache_dir=cache_dir, device="cpu", tls_cert=str(issued.cert),
                      tls_key=str(issued.key), tls_client_ca=str(ca.pem), http_port=0) as server:
        url = f"https://localhost:{server.running.http.port}/health"
        anonymous = ssl.create_default_context(cafile=str(ca.pem))
        assert _refused(lambda: httpx.get(url, verify=anonymous, timeout=10))
        known = ssl.create_default_context(cafile=str(ca.pem))
        known.load_cert_chain(str(client_cert.cert), str(client_cert.key))
        assert httpx.get(url, verify=known, timeout=60).status_code == 200
