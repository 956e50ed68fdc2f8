"""The application's arguments (the `args:` of its entry in a Ray Serve config file), validated once."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.config import ServerConfig, add_config_arguments

# The engine settings a replica decides itself: it listens on nothing (Ray's proxies do) and loads adapters only
# through its multiplexed loader, from the store.
_OWNED = {"adapters_dir", "adapters_load_root", "adapters_poll_interval", "host", "port", "http_port", "http_host",
          "metrics_port", "metrics_host", "tls_cert", "tls_key", "tls_client_ca", "admin_token"}


@dataclass(frozen=True)
class RayAppSettings:
    """What one deltaserve application on Ray Serve serves.

    `adapters_store` is a directory every node can read (each subdirectory an adapter, named after it);
    `max_adapters_per_replica` bounds the adapters resident in one replica (Ray's multiplexing LRU, and the
    engine's device slots); `engine` holds any other `deltaserve serve` setting by its config name (threads,
    kv_cache_tokens, max_batch_size, ...); `replica_retries` is how often the ingress sends a request again when
    the replica serving it dies before its first byte went out.
    """

    model: str = "default"
    adapters_store: str = ""
    max_adapters_per_replica: int = 8
    engine: dict[str, Any] = field(default_factory=dict)
    replica_retries: int = 2

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> RayAppSettings:
        args = dict(args or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"unknown deltaserve application argument(s) {unknown}; known: {sorted(known)}")
        settings = cls(**args)
        settings.validate()
        return settings

    def validate(self) -> None:
        if not isinstance(self.max_adapters_per_replica, int) or self.max_adapters_per_replica <= 0:
            raise ValueError("max_adapters_per_replica must be a positive integer, got "
                             f"{self.max_adapters_per_replica!r}")
        if not isinstance(self.replica_retries, int) or self.replica_retries < 0:
            raise ValueError(f"replica_retries must be a non-negative integer, got {self.replica_retries!r}")
        if not isinstance(self.engine, dict):
            raise ValueError("engine must be a mapping of deltaserve serve settings")
        owned = sorted(set(self.engine) & _OWNED)
        if owned:
            raise ValueError(f"engine settings {owned} are decided by the Ray application (Ray's proxies listen; "
                             "adapters come from adapters_store)")
        if self.adapters_store and not Path(self.adapters_store).is_dir():
            raise ValueError(f"adapters_store {self.adapters_store!r} is not a directory")
        self.server_config()  # every engine setting checked here, before any replica starts

    def server_config(self) -> ServerConfig:
        """The engine's configuration in a replica: `deltaserve serve`'s defaults and DELTASERVE_* environment
        variables, then `engine`; no listening sockets, no directory scan or watching; the store is the only root
        adapters load from; device slots for the per-replica adapter limit."""
        parser = argparse.ArgumentParser()
        add_config_arguments(parser)
        defaults = vars(parser.parse_args([]))
        unknown = sorted(set(self.engine) - set(defaults))
        if unknown:
            raise ValueError(f"unknown engine setting(s) {unknown}: see `deltaserve serve --help`")
        fields = {**defaults, "max_device_adapters": self.max_adapters_per_replica, **self.engine}
        store = str(Path(self.adapters_store).resolve()) if self.adapters_store else ""
        fields.update(model=self.model, adapters_dir="", adapters_load_root=store,
                      adapters_poll_interval=0, port=0, http_port=-1, metrics_port=-1)
        return ServerConfig(**fields)

    def to_args(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def store_names(self) -> list[str]:
        """The adapters the store holds (what /v1/models lists): every subdirectory."""
        if not self.adapters_store:
            return []
        return sorted(p.name for p in Path(self.adapters_store).iterdir() if p.is_dir() and not p.name.startswith("."))
