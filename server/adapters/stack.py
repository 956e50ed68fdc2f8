"""Builds the adapter side of the serving stack: registry (host/disk tiers), device slots, watcher, admin."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from adapters_store.events import StoreListener
from adapters_store.host_tier import HostLimits
from adapters_store.registry import AdapterRegistry
from adapters_store.spec import ModelSpec
from adapters_store.watcher import DirectoryWatcher
from server.adapters.manager import AdapterManager
from server.config import ServerConfig
from server.deltas.deltaset import DeltaSet
from server.engine.residency import AdapterSlots, SharedKV
from server.model.loader import LoadedModel

log = logging.getLogger("deltaserve")


@dataclass
class Adapters:
    """The adapter tiers and their administration; `start()` begins watching --adapters-dir."""

    registry: AdapterRegistry
    slots: AdapterSlots
    manager: AdapterManager
    watcher: DirectoryWatcher | None

    def start(self) -> None:
        if self.watcher is not None:
            self.watcher.start()

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        self.registry.close()


def build_adapters(loaded: LoadedModel, config: ServerConfig, deltas: DeltaSet, shared_kv: SharedKV,
                   listener: StoreListener | None = None) -> Adapters:
    """Registers every adapter in --adapters-dir (refusing those the slots cannot hold) before returning."""
    host = HostLimits(max_adapters=config.max_host_adapters, max_bytes=config.max_host_adapter_mib * 2**20)
    registry = AdapterRegistry(ModelSpec.from_hf_model(loaded.model), config.adapters_dir or None, listener,
                               accept=lambda weights: deltas.check(weights.parts), host=host)
    watcher = None
    if registry.adapters_dir is not None:
        if config.adapters_poll_interval > 0:
            watcher = DirectoryWatcher(registry, registry.adapters_dir, config.adapters_poll_interval)
            watcher.adopt_scan()  # before the scan: files that change during it are loaded again
        registry.scan()
        log.info("serving %d adapters from %s (%d rejected)", len(registry), registry.adapters_dir,
                 len(registry.rejected))
    slots = AdapterSlots(registry, deltas, shared_kv)
    manager = AdapterManager(registry, slots, [config.adapters_load_root, config.adapters_dir])
    return Adapters(registry, slots, manager, watcher)
