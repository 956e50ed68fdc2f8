"""The host tier: which versions keep their validated weights in memory, least recently used dropped first."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from adapters_store.versions import AdapterVersion

log = logging.getLogger("deltaserve.store")


@dataclass(frozen=True)
class HostLimits:
    """How much the host tier holds: at most `max_adapters` versions and `max_bytes` bytes (0 = no byte limit)."""

    max_adapters: int = 256
    max_bytes: int = 0

    def exceeded(self, count: int, nbytes: int) -> bool:
        return count > self.max_adapters or (self.max_bytes > 0 and nbytes > self.max_bytes)


class HostTier:
    """Versions whose weights are in memory, oldest use first. Not thread-safe: the registry's lock guards it.

    `evict` drops the weights of the least recently used versions that are not protected (pinned, or wanted by
    a request that has not been placed yet) until the limits hold; a dropped version is on disk only and is
    read back when a request needs it. Protected versions may keep the tier above its limits for a while.
    """

    def __init__(self, limits: HostLimits) -> None:
        self.limits = limits
        self._lru: OrderedDict[AdapterVersion, None] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._lru)

    def add(self, version: AdapterVersion) -> None:
        if version not in self._lru:
            self.nbytes += version.nbytes
        self._lru[version] = None
        self._lru.move_to_end(version)

    def touch(self, version: AdapterVersion) -> None:
        if version in self._lru:
            self._lru.move_to_end(version)

    def drop(self, version: AdapterVersion) -> None:
        """Forgets the version's weights (it is retired, or evicted)."""
        if version in self._lru:
            del self._lru[version]
            self.nbytes -= version.nbytes
        version.weights = None

    def evict(self, protected: Callable[[AdapterVersion], bool]) -> list[AdapterVersion]:
        """Drops least recently used unprotected versions until within the limits; returns them."""
        dropped: list[AdapterVersion] = []
        if not self.limits.exceeded(len(self._lru), self.nbytes):
            return dropped
        for version in list(self._lru):
            if not self.limits.exceeded(len(self._lru), self.nbytes):
                break
            if not protected(version):
                self.drop(version)
                dropped.append(version)
        return dropped


class MemoryReturner:
    """Gives freed heap memory back to the operating system (glibc's malloc_trim), soon after it is asked to.

    Adapter tensors are small allocations that glibc keeps in its arenas after they are freed; without a trim,
    unloading hundreds of adapters would not lower the process's resident memory. Requests within `delay`
    seconds share one trim, run on a timer thread (ctypes releases the GIL while malloc_trim runs).
    """

    def __init__(self, delay: float = 0.2) -> None:
        self.delay = delay
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        name = ctypes.util.find_library("c")
        libc = ctypes.CDLL(name) if name else None
        self._trim = getattr(libc, "malloc_trim", None) if libc is not None else None

    def request(self) -> None:
        if self._trim is None:
            return
        with self._lock:
            if self._timer is not None:
                return
            self._timer = threading.Timer(self.delay, self.trim_now)
            self._timer.daemon = True
            self._timer.start()

    def trim_now(self) -> None:
        with self._lock:
            self._timer = None
        if self._trim is not None:
            self._trim(0)
