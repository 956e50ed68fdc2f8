"""Adapters in one replica: Ray's multiplexed loader loads them from the store through the admin manager (the
single-node server's store code), its LRU eviction unloads them, and per-replica counts show where requests ran."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

from ray import serve

from adapters_store.errors import AdapterError
from server.adapters.errors import InvalidAdminRequest, PathNotAllowed
from server.adapters.manager import NAME, AdapterManager
from server.engine.errors import InvalidRequest, UnknownAdapter

log = logging.getLogger("deltaserve.ray")


class ResidentAdapter:
    """What the multiplexed loader returns for one adapter id. Ray calls the instance's `__del__` (an async
    attribute, so garbage collection never calls it) when its LRU evicts the adapter."""

    def __init__(self, name: str, owner: ReplicaAdapters) -> None:
        self.name = name
        self.owner = owner
        self.__del__ = self._evicted

    async def _evicted(self) -> None:
        await self.owner.evicted(self)


class ReplicaAdapters:
    """The adapters resident in this replica, at most `limit` (Ray's `max_num_models_per_replica`).

    Ray's LRU may evict an adapter while requests of it still run here: it is unloaded when the last of them
    ends (new requests go where Ray routes them, and load it again if they land here)."""

    def __init__(self, manager: AdapterManager, store: str, limit: int) -> None:
        self.manager = manager
        self.store = Path(store).resolve() if store else None
        self.limit = limit
        self.loads = 0
        self.evictions = 0
        self.requests: Counter[str] = Counter()
        self._running: Counter[str] = Counter()
        self._resident: dict[str, ResidentAdapter] = {}
        self._deferred: set[str] = set()
        self._store_lock = asyncio.Lock()   # one load or unload at a time: a deferred unload races Ray's loads

        async def load(name: str) -> ResidentAdapter:  # a function: Ray keeps its LRU in an attribute of it
            return await self._load(name)

        self.load = serve.multiplexed(max_num_models_per_replica=limit)(load)

    def check(self, name: str) -> None:
        """Raises UnknownAdapter (NOT_FOUND) or InvalidRequest unless the store holds an adapter `name`."""
        if not NAME.fullmatch(name):
            raise InvalidRequest(f"adapter id {name[:128]!r} is not a valid adapter name")
        if self.store is None or not (self.store / name).is_dir():
            raise UnknownAdapter(f"adapter {name!r} is not in the adapter store")

    @contextlib.asynccontextmanager
    async def holding(self, name: str) -> AsyncIterator[None]:
        """Makes `name` ("" = the base model) resident for one request while it runs here."""
        if name:
            self.check(name)
        self.requests[name] += 1
        if not name:
            yield
            return
        self._running[name] += 1
        try:
            await self.load(name)
            yield
        finally:
            self._running[name] -= 1
            if not self._running[name] and name in self._deferred:
                await self._unload(name)

    async def _load(self, name: str) -> ResidentAdapter:
        path = str(self.store / name) if self.store else name   # absolute: the manager reads relative to its root
        try:
            async with self._store_lock:
                await asyncio.get_running_loop().run_in_executor(None, self.manager.load, name, path)
        except (InvalidAdminRequest, PathNotAllowed) as error:
            raise InvalidRequest(str(error)) from None
        except AdapterError as error:
            raise UnknownAdapter(f"adapter {name!r} could not be loaded from the store: {error}") from None
        self._deferred.discard(name)
        self.loads += 1
        resident = ResidentAdapter(name, self)
        self._resident[name] = resident
        log.info("adapter %s loaded (%d loads, %d resident)", name, self.loads, len(self._resident))
        return resident

    async def evicted(self, resident: ResidentAdapter) -> None:
        if self._resident.get(resident.name) is not resident:
            return
        del self._resident[resident.name]
        self.evictions += 1
        if self._running[resident.name]:
            self._deferred.add(resident.name)
        else:
            await self._unload(resident.name)

    async def _unload(self, name: str) -> None:
        self._deferred.discard(name)
        async with self._store_lock:
            if name in self._resident:  # loaded again meanwhile
                return
            with contextlib.suppress(KeyError):
                await asyncio.get_running_loop().run_in_executor(None, self.manager.unload, name)
        log.info("adapter %s evicted (%d evictions)", name, self.evictions)

    def resident(self) -> list[str]:
        return sorted(self._resident)
