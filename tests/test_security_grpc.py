"""Transport security and bounded errors over real gRPC (tiny model): TLS with the project's client, a stock
channel and deltactl; plaintext and wrong-CA clients refused; mutual TLS; a rotated certificate served without a
restart; API keys on inference calls only, never logged; long input and garbage bodies get short INVALID_ARGUMENT."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import ssl

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from clients.channel import TlsOptions
from clients.cli import main as deltactl
from clients.client import DeltaClient
from deltaserve.v1 import adapters_pb2 as apb
from deltaserve.v1 import adapters_pb2_grpc as apb_grpc
from deltaserve.v1 import generation_pb2 as pb
from deltaserve.v1 import generation_pb2_grpc as pb_grpc
from tests.certs import CertificateAuthority
from tests.helpers import ServerThread
from tests.hotload_helpers import wait_until

REQUEST = pb.GenerateRequest(text="Hello", stopping=pb.StoppingCriteria(max_new_tokens=2, ignore_eos=True))
KEYS = ("k-first-3f9a", "k-second-77c1", "k-third-0b2e")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca, other = CertificateAuthority(root), CertificateAuthority(root, "other CA")
    return ca, other, ca.issue("server"), ca.issue("client", client=True), other.issue("stranger", client=True)


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code()


def _secure(port: int, ca: bytes, cert: bytes | None = None, key: bytes | None = None) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    return grpc.secure_channel(f"localhost:{port}", creds)


def _served_serial(port: int, ca_file: str) -> int:
    """The serial number of the certificate a new TLS connection is shown."""
    context = ssl.create_default_context(cafile=ca_file)
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            return int(tls.getpeercert()["serialNumber"], 16)


def test_tls_clients_refusals_and_rotation(tiny_model_dir, cache_dir, pki, tmp_path, monkeypatch):
    ca, other, issued, _, _ = pki
    cert, key = shutil.copy(issued.cert, tmp_path / "tls.pem"), shutil.copy(issued.key, tmp_path / "tls.key")
    with ServerThread(model=str(tiny_model_dir), cache_dir=cache_dir, device="cpu", tls_cert=str(cert),
                      tls_key=str(key)) as server:
        port = server.running.port
        with _secure(port, ca.pem.read_bytes()) as channel:
            assert len(pb_grpc.GenerationStub(channel).Generate(REQUEST, timeout=60).token_ids) == 2
        with DeltaClient(f"localhost:{port}", timeout=60, tls=TlsOptions(ca=str(ca.pem))) as client:
            assert len(client.generate("Hello", max_new_tokens=2, ignore_eos=True).token_ids) == 2
        monkeypatch.setenv("DELTASERVE_TARGET", f"localhost:{port}")
        assert deltactl(["health", "--tls-ca", str(ca.pem)]) == 0
        assert _code(lambda: server.stub.Generate(REQUEST, timeout=10)) == grpc.StatusCode.UNAVAILABLE
        with _secure(port, other.pem.read_bytes()) as wrong:
            assert _code(lambda: pb_grpc.GenerationStub(wrong).Generate(REQUEST, timeout=10)) == \
                grpc.StatusCode.UNAVAILABLE
        assert _served_serial(port, str(ca.pem)) == issued.serial
        rotated = ca.issue("server-rotated")
        for src, dst in ((rotated.key, key), (rotated.cert, cert)):   # each file replaced whole
            shutil.copy(src, tmp_path / "incoming")
            os.replace(tmp_path / "incoming", dst)
        wait_until(lambda: _served_serial(port, str(ca.pem)) == rotated.serial, timeout=60)
        with _secure(port, ca.pem.read_bytes()) as channel:
            assert len(pb_grpc.GenerationStub(channel).Generate(REQUEST, timeout=60).token_ids) == 2


def test_mutual_tls_refuses_clients_without_a_certificate_from_the_ca(tiny_model_dir, cache_dir, pki):
    ca, _, issued, client, stranger = pki
    with ServerThread(model=str(tiny_model_dir), cache_dir=cache_dir, device="cpu", tls_cert=str(issued.cert),
                      tls_key=str(issued.key), tls_client_ca=str(ca.pem)) as server:
        port, trust = server.running.port, ca.pem.read_bytes()
        with _secure(port, trust) as anonymous:
            assert _code(lambda: pb_grpc.GenerationStub(anonymous).Generate(REQUEST, timeout=10)) == \
                grpc.StatusCode.UNAVAILABLE
        with _secure(port, trust, stranger.cert.read_bytes(), stranger.key.read_bytes()) as foreign:
            assert _code(lambda: pb_grpc.GenerationStub(foreign).Generate(REQUEST, timeout=10)) == \
                grpc.StatusCode.UNAVAILABLE
        tls = TlsOptions(ca=str(ca.pem), cert=str(client.cert), key=str(client.key))
        with DeltaClient(f"localhost:{port}", timeout=60, tls=tls) as known:
            assert len(known.generate("Hello", max_new_tokens=2, ignore_eos=True).token_ids) == 2


@pytest.fixture(scope="module")
def keyed(tiny_model_dir, cache_dir, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text(f"# one key per line\n{KEYS[1]}\n\n{KEYS[2]}\n")
    with ServerThread(model=str(tiny_model_dir), cache_dir=cache_dir, device="cpu", api_key=KEYS[0],
                      api_key_file=str(key_file), adapters_load_root=str(key_file.parent)) as server:
        yield server


def test_api_keys_guard_inference_only_and_are_never_logged(keyed, caplog):
    caplog.set_level(logging.DEBUG)
    stub = keyed.stub
    assert _code(lambda: stub.Generate(REQUEST)) == grpc.StatusCode.UNAUTHENTICATED
    assert _code(lambda: stub.Generate(REQUEST, metadata=[("authorization", "Bearer nope")])) == \
        grpc.StatusCode.UNAUTHENTICATED
    assert _code(lambda: list(stub.GenerateStream(REQUEST))) == grpc.StatusCode.UNAUTHENTICATED
    assert _code(lambda: stub.ModelInfo(pb.ModelInfoRequest())) == grpc.StatusCode.UNAUTHENTICATED
    for key in KEYS:
        assert len(stub.Generate(REQUEST, metadata=[("authorization", f"Bearer {key}")]).token_ids) == 2
    events = list(stub.GenerateStream(REQUEST, metadata=[("authorization", f"Bearer {KEYS[2]}")]))
    assert events[-1].HasField("final")
    health = health_pb2_grpc.HealthStub(keyed.channel)
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(keyed.channel)
    answer = next(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    assert "deltaserve.v1.Generation" in {s.name for s in answer.list_services_response.service}
    with DeltaClient(keyed.target, timeout=60, api_key=KEYS[1]) as client:
        assert client.health() == "SERVING" and client.model_info()["model_id"]
    text = caplog.text + repr(keyed.config) + str(keyed.config)
    assert not any(key in text for key in KEYS)


def _raw(channel: grpc.Channel, method: str, streaming: bool = False):
    if streaming:
        return channel.unary_stream(method, request_serializer=None, response_deserializer=None)
    return channel.unary_unary(method, request_serializer=None, response_deserializer=None)


def test_unbounded_input_and_garbage_bodies_get_short_invalid_argument(keyed, caplog):
    caplog.set_level(logging.INFO)
    auth = [("authorization", f"Bearer {KEYS[0]}")]
    long_id = "a" * 65536
    with pytest.raises(grpc.RpcError) as caught:
        keyed.stub.Generate(pb.GenerateRequest(text="Hi", adapter_id=long_id), metadata=auth)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and len(caught.value.details()) < 300
    chat = pb.GenerateRequest(chat=pb.ChatPrompt(messages=[pb.ChatMessage(role="r" * 100000, content="x")]))
    with pytest.raises(grpc.RpcError) as caught:
        keyed.stub.Generate(chat, metadata=auth)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and len(caught.value.details()) < 300
    garbage = b"\xff\xfe\x00garbage\x08\x96\x01" * 50
    for method, streaming in (("/deltaserve.v1.Generation/Generate", False),
                              ("/deltaserve.v1.Generation/GenerateStream", True),
                              ("/deltaserve.v1.Adapters/ListAdapters", False)):
        with pytest.raises(grpc.RpcError) as caught:
            call = _raw(keyed.channel, method, streaming)(garbage, metadata=auth, timeout=30)
            list(call) if streaming else None
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
        assert len(caught.value.details()) < 300
    admin = apb_grpc.AdaptersStub(keyed.channel)
    with pytest.raises(grpc.RpcError) as caught:
        admin.LoadAdapter(apb.LoadAdapterRequest(name="n" * 65536, path="/" + "p" * 65536))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and len(caught.value.details()) < 300
    with pytest.raises(grpc.RpcError) as caught:
        admin.LoadAdapter(apb.LoadAdapterRequest(name="ok", path="/" + "p" * 65536))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED and len(caught.value.details()) < 600
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(keyed.stub.Generate(REQUEST, metadata=auth).token_ids) == 2   # still serving
