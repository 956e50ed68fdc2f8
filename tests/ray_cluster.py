"""A local Ray cluster serving deltaserve for the tests: small (no dashboard, a 128 MiB object store, logs in a
temporary directory), on free ports, with the repository's own Serve config file adapted to the test."""

from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "deploy" / "ray" / "serve.yaml"
APP = "deltaserve"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_config(out: Path, store: Path, replicas: int = 2, max_adapters: int = 4, **engine: Any) -> Path:
    """deploy/ray/serve.yaml with free ports, the test's store, `replicas` CPU engine replicas of one CPU each (so
    one torch thread each, unless `engine` says otherwise)."""
    config = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    config["http_options"].update(host="127.0.0.1", port=free_port())
    config["grpc_options"]["port"] = free_port()
    app = config["applications"][0]
    app["args"].update(adapters_store=str(store), max_adapters_per_replica=max_adapters)
    app["args"]["engine"].update({"kv_cache_tokens": 4096, "max_batch_size": 32, **engine})
    engine_deployment = next(d for d in app["deployments"] if d["name"] == "DeltaEngine")
    engine_deployment.update(num_replicas=replicas, health_check_period_s=1, graceful_shutdown_timeout_s=2)
    out.write_text(yaml.safe_dump(config), encoding="utf-8")
    return out


class LocalRayServe:
    """Starts Ray and the application from a config file; `stop()` shuts both down and removes Ray's files."""

    def __init__(self, config_path: Path, num_cpus: int = 2) -> None:
        from server.ray.launch import read_config

        self.config = read_config(config_path)
        self.num_cpus = num_cpus
        self.temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.config.grpc_options.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.config.http_options.port}"

    def start(self, timeout: float = 240) -> LocalRayServe:
        from server.ray.launch import start, wait_running

        start(self.config, None, num_cpus=self.num_cpus, include_dashboard=False, object_store_memory=128 * 2**20,
              _temp_dir=self.temp_dir, log_to_driver=False, configure_logging=False)
        wait_running(self.config, timeout)
        return self

    def engine(self) -> Any:
        from ray import serve

        return serve.get_deployment_handle("DeltaEngine", APP)

    def stop(self) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(self.temp_dir, ignore_errors=True)
