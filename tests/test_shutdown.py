"""Graceful shutdown of a real `deltaserve serve` process: on SIGTERM health goes NOT_SERVING, new
calls are refused, and an in-flight stream finishes within the grace period."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deltaserve.v1 import generation_pb2 as pb
from deltaserve.v1 import generation_pb2_grpc as pb_grpc


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_serving(channel: grpc.Channel, process: subprocess.Popen, timeout: float = 120) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read() if process.stdout else "server exited"
        try:
            if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise TimeoutError("server never became SERVING")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_drains_in_flight_and_refuses_new(tiny_model_dir, cache_dir, sig):
    port = _free_port()
    env = {**os.environ, "DELTASERVE_PORT": str(port)}  # the env twin of --port
    process = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--model", str(tiny_model_dir), "--cache-dir", cache_dir,
         "--host", "127.0.0.1", "--metrics-port", "-1", "--http-port", "0", "--kv-cache-tokens", "2048",
         "--grace-period", "20"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        _wait_serving(channel, process)
        stub = pb_grpc.GenerationStub(channel)
        stream = stub.GenerateStream(pb.GenerateRequest(text="Hello", stopping=pb.StoppingCriteria(
            max_new_tokens=300, ignore_eos=True)))
        first = next(stream)
        assert first.HasField("token")
        events: list[pb.GenerateStreamResponse] = []
        reader = threading.Thread(target=lambda: events.extend(stream))
        reader.start()
        process.send_signal(sig)
        time.sleep(0.5)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Generate(pb.GenerateRequest(text="new"), timeout=5)
        assert refused.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        reader.join(timeout=60)
        assert events and events[-1].HasField("final")
        assert events[-1].final.finish_reason == pb.FINISH_REASON_LENGTH
        assert events[-1].final.generated_tokens == 300
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
