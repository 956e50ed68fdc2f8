"""`deltaserve ray-serve CONFIG`: the same Serve config file `serve run CONFIG` takes, deployed on a Ray cluster
(RAY_ADDRESS or --address) or on a small local one started here; runs until SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("deltaserve.ray")
APP_IMPORT_PATH = "server.ray.app:build_app"


def read_config(path: str | Path) -> Any:
    """The validated ServeDeploySchema; ValueError with the reason for a file that is not one."""
    from ray.serve.schema import ServeDeploySchema

    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        config = ServeDeploySchema.model_validate(raw)
    except (OSError, yaml.YAMLError, ValueError) as error:
        raise ValueError(f"{path}: not a Ray Serve config file: {error}") from None
    ours = [app for app in config.applications if app.import_path == APP_IMPORT_PATH]
    if not ours:
        raise ValueError(f"{path}: no application has import_path {APP_IMPORT_PATH!r}")
    for app in ours:  # replicas do not share this process's directory: a relative store is taken from here
        store = (app.args or {}).get("adapters_store")
        if store:
            app.args["adapters_store"] = str(Path(store).resolve())
    return config


def start(config: Any, address: str | None = None, **ray_init: Any) -> None:
    """Connects to (or starts) Ray, starts Serve's proxies with the file's options, submits the applications."""
    import ray
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions

    if not ray.is_initialized():
        ray.init(address=address, namespace="serve", **ray_init)
    client = serve_api.serve_start(http_options=config.http_options.model_dump(),
                                   proxy_location=config.proxy_location,
                                   grpc_options=gRPCOptions(**config.grpc_options.model_dump()))
    client.deploy_apps(config, _blocking=False)


def wait_running(config: Any, timeout: float) -> None:
    """Until every application of the file is RUNNING; RuntimeError when one fails or time runs out."""
    from ray import serve

    names = [app.name for app in config.applications]
    deadline = time.monotonic() + timeout
    while True:
        apps = serve.status().applications
        states = {name: apps[name].status if name in apps else "NOT_STARTED" for name in names}
        if all(state == "RUNNING" for state in states.values()):
            return
        failed = [name for name, state in states.items() if state in ("DEPLOY_FAILED", "UNHEALTHY")]
        if failed or time.monotonic() > deadline:
            details = "; ".join(f"{name}: {apps[name].status} {apps[name].message}" for name in names if name in apps)
            raise RuntimeError(f"applications not running after {timeout:.0f} s: {details or states}")
        time.sleep(0.5)


def run(path: str, address: str | None, num_cpus: int | None, object_store_mib: int, timeout: float) -> int:
    config = read_config(path)
    local = {} if address else {"num_cpus": num_cpus, "include_dashboard": False,
                                "object_store_memory": object_store_mib * 2**20}
    start(config, address, **local)
    wait_running(config, timeout)
    log.info("deltaserve on Ray Serve: HTTP on port %s, gRPC on port %s", config.http_options.port,
             config.grpc_options.port)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    stop_serving(config, local=not address)
    return 0


def stop_serving(config: Any, local: bool) -> None:
    """Deletes the file's applications; a local cluster started here is shut down with its proxies."""
    import ray
    from ray import serve

    if local:
        serve.shutdown()
        ray.shutdown()
        return
    for app in config.applications:
        serve.delete(app.name)
