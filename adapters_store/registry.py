"""The server's adapter registry: names -> versions, hot loads and unloads, the host and disk tiers.

Reading and validating files is slow and runs on the caller's thread (an admin RPC's worker, the directory
watcher) or on the registry's own I/O threads (reading an adapter back from disk); everything else is quick
bookkeeping under one lock, safe to call from the engine thread.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from os import PathLike
from pathlib import Path

import torch

from adapters_store.errors import AdapterError, AdapterNotFound
from adapters_store.events import DELTA_REJECTED, StoreListener
from adapters_store.host_tier import HostLimits, HostTier, MemoryReturner
from adapters_store.loader import load_adapter
from adapters_store.spec import ModelSpec
from adapters_store.types import AdapterWeights
from adapters_store.versions import AdapterEntry, AdapterState, AdapterVersion, Fingerprint, fingerprint

log = logging.getLogger("deltaserve.store")

# Told (outside the registry's lock) of every version that will never be given to a new request again.
RetireListener = Callable[[AdapterVersion], None]
# The server's own check of a loaded adapter (e.g. its rank fits the slots): raises ValueError to refuse it.
Acceptor = Callable[[AdapterWeights], None]


_thread = threading.local()
# Niceness of the threads that read adapters: on a machine with few cores, reading and validating must not take
# CPU time from the engine's threads, or decoding slows down while adapters load.
IO_NICENESS = 10


def _background_thread() -> None:
    _thread.io = True
    # One torch thread here: the engine thread alone keeps an OpenMP team (server/engine/threads.py says why).
    torch.set_num_threads(1)
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), IO_NICENESS)
    except (AttributeError, OSError):  # not Linux (per-thread niceness), or not allowed: run as is
        pass


class AdapterRegistry:
    """Adapters served by name, each name with a current version; thread-safe.

    - `load(name, path)` reads and validates a directory and makes it the name's new current version (the old
      one is retired: requests already running on it finish on it, new ones get the new one).
    - `unload(name)` refuses new requests at once and forgets the name when its last request has ended.
    - `reserve(name)` / `unreserve(entry)` bracket one request (NOT_FOUND for a name that is not READY).
    - Weights stay in host memory within `HostLimits` (least recently used dropped first, pinned ones never);
      a dropped version is read back from its files when a request needs it (`fetch`).

    It also offers the read side of `AdapterStore` (`adapters`, `rejected`, `get`, `names`) over current versions.
    """

    def __init__(self, spec: ModelSpec, adapters_dir: str | PathLike[str] | None = None,
                 listener: StoreListener | None = None, accept: Acceptor | None = None,
                 host: HostLimits | None = None, io_threads: int = 2) -> None:
        self.spec = spec
        self.adapters_dir = Path(adapters_dir) if adapters_dir else None
        self.listener = listener or StoreListener()
        self.accept = accept
        self.host = HostTier(host or HostLimits())
        self.memory = MemoryReturner()
        self._lock = threading.RLock()
        self._entries: dict[str, AdapterEntry] = {}
        self._last_version: dict[str, int] = {}   # kept after an unload: (name, version) is never reused
        self._name_locks: dict[str, threading.Lock] = {}
        self._retire_listeners: list[RetireListener] = []
        self._io = ThreadPoolExecutor(io_threads, thread_name_prefix="deltaserve-adapter-io",
                                      initializer=_background_thread)

    # ---- what is served --------------------------------------------------------------------------------

    @property
    def adapters(self) -> dict[str, AdapterVersion]:
        """The current version of every READY name."""
        with self._lock:
            return {name: e.current for name, e in self._entries.items()
                    if e.state is AdapterState.READY and e.current is not None}

    @property
    def rejected(self) -> dict[str, AdapterError]:
        with self._lock:
            return {name: e.error for name, e in self._entries.items()
                    if e.state is AdapterState.REJECTED and e.error is not None}

    def get(self, name: str) -> AdapterVersion:
        """The name's current version (also while it unloads); AdapterNotFound says why there is none."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                raise AdapterNotFound(name, "no adapter of that name is loaded")
            if entry.current is None:
                raise AdapterNotFound(name, entry.unavailable())
            return entry.current

    def entry(self, name: str) -> AdapterEntry:
        with self._lock:
            entry = self._entries.get(name)
        if entry is None:
            raise AdapterNotFound(name, "no adapter of that name is loaded")
        return entry

    def entries(self) -> list[AdapterEntry]:
        with self._lock:
            return [self._entries[name] for name in sorted(self._entries)]

    def names(self) -> list[str]:
        return sorted(self.adapters)

    def source_of(self, name: str) -> str | None:
        with self._lock:
            entry = self._entries.get(name)
            return entry.source if entry is not None else None

    def pinned(self, exclude: str = "") -> int:
        """How many names other than `exclude` have a pinned current version."""
        with self._lock:
            return sum(1 for e in self._entries.values() if e.name != exclude and e.current and e.current.pinned)

    def __contains__(self, name: object) -> bool:
        return name in self.adapters

    def __len__(self) -> int:
        return len(self.adapters)

    def on_retire(self, listener: RetireListener) -> None:
        self._retire_listeners.append(listener)

    # ---- loading and unloading ---------------------------------------------------------------------------

    def scan(self) -> list[str]:
        """Loads every subdirectory of `adapters_dir` (hidden ones aside), in parallel; returns those served."""
        if self.adapters_dir is None:
            return []
        if not self.adapters_dir.is_dir():
            raise FileNotFoundError(f"adapters directory {self.adapters_dir} does not exist or is not a directory")
        paths = sorted(p for p in self.adapters_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        loaded = [name for name in self._io.map(self._scan_one, paths) if name]
        log.info("scanned %s: %d adapter(s) served, %d rejected", self.adapters_dir, len(loaded), len(self.rejected))
        return loaded

    def _scan_one(self, path: Path) -> str | None:
        try:
            self.load(path.name, path, source="dir")
        except AdapterError:
            return None
        return path.name

    def load(self, name: str, path: str | PathLike[str], *, pinned: bool = False,
             source: str = "api") -> AdapterVersion:
        """Reads and validates `path` and serves it as `name`'s new current version; raises AdapterError.

        A refused load leaves a current version serving; a name with none is recorded as REJECTED.
        """
        with self._name_lock(name):
            with self._lock:
                if name not in self._entries:
                    self._entries[name] = AdapterEntry(name, str(path), source)
            try:
                if getattr(_thread, "io", False):
                    weights, fp, seconds = self._read(name, path)
                else:  # read on a background thread: it yields the CPU to the engine
                    weights, fp, seconds = self._io.submit(self._read, name, path).result()
            except AdapterError as error:
                self._refuse(name, path, source, error)
                raise
            return self._commit(name, str(path), source, pinned, weights, fp, seconds)

    def _name_lock(self, name: str) -> threading.Lock:
        with self._lock:
            return self._name_locks.setdefault(name, threading.Lock())

    def _read(self, name: str, path: str | PathLike[str]) -> tuple[AdapterWeights, Fingerprint, float]:
        before = fingerprint(path)
        start = time.perf_counter()
        try:
            weights = load_adapter(name, path, self.spec)
            if fingerprint(path) != before:
                raise AdapterError("load_failed", f"the files in {path} changed while they were read; load again "
                                   "once they are complete", adapter=name, path=str(path))
        except AdapterError as error:
            self.listener.on_load_failed(name, error.reason)
            log.warning("rejected %s", error)
            raise
        except Exception as exc:  # one adapter's surprise must not take anything else down
            log.exception("unexpected error loading adapter %r from %s", name, path)
            self.listener.on_load_failed(name, "load_failed")
            raise AdapterError("load_failed", f"{type(exc).__name__}: {exc}", adapter=name, path=str(path)) from exc
        seconds = time.perf_counter() - start
        self.listener.on_load(weights, seconds)
        if self.accept is not None:
            try:
                self.accept(weights)
            except ValueError as exc:
                self.listener.on_load_failed(name, DELTA_REJECTED)
                log.warning("rejected adapter %r: %s", name, exc)
                raise AdapterError("unsupported_option", str(exc), adapter=name, path=str(path)) from exc
        return weights, before or (), seconds

    def _commit(self, name: str, path: str, source: str, pinned: bool, weights: AdapterWeights,
                fp: Fingerprint, seconds: float) -> AdapterVersion:
        with self._lock:
            number = self._last_version[name] = self._last_version.get(name, 0) + 1
            version = AdapterVersion.of(weights, number, fp, pinned, seconds)
            entry = self._entries.get(name)
            if entry is None:
                entry = self._entries[name] = AdapterEntry(name, path, source)
            old = entry.current
            entry.path, entry.source, entry.current = path, source, version
            entry.state, entry.error = AdapterState.READY, None
            self.host.add(version)
            retired = [self._retire(old)] if old is not None else []
            self.host.evict(self._protected)
        self._notify(retired)
        log.info("loaded adapter %r version %d from %s: %s, %s, %d parameters (%.2f MiB) in %.0f ms", name, number,
                 path, version.format, "+".join(version.methods), version.num_parameters, version.nbytes / 2**20,
                 seconds * 1000)
        return version

    def _refuse(self, name: str, path: str | PathLike[str], source: str, error: AdapterError) -> None:
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                entry = self._entries[name] = AdapterEntry(name, str(path), source)
            entry.error = error
            if entry.current is None:
                entry.state = AdapterState.REJECTED

    def unload(self, name: str) -> AdapterState:
        """Stops new requests for `name` now; forgets it once its in-flight requests end.

        Returns UNLOADING while requests are still running on it, else UNLOADED.
        """
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                raise AdapterNotFound(name, "no adapter of that name is loaded")
            if entry.pending > 0 and entry.current is not None:
                entry.state = AdapterState.UNLOADING
                log.info("unloading adapter %r once its %d request(s) end", name, entry.pending)
                return AdapterState.UNLOADING
            retired = self._remove(entry)
        self._notify(retired)
        return AdapterState.UNLOADED

    def _remove(self, entry: AdapterEntry) -> list[AdapterVersion]:
        del self._entries[entry.name]
        entry.state = AdapterState.UNLOADED
        retired = [self._retire(entry.current)] if entry.current is not None else []
        entry.current = None
        log.info("unloaded adapter %r", entry.name)
        return retired

    def _retire(self, version: AdapterVersion) -> AdapterVersion:
        version.retired = True
        self.host.drop(version)
        return version

    def _notify(self, retired: list[AdapterVersion]) -> None:
        for version in retired:
            for listener in self._retire_listeners:
                listener(version)
        if retired:
            self.memory.request()

    def _protected(self, version: AdapterVersion) -> bool:
        entry = self._entries.get(version.name)
        return version.pinned or (entry is not None and entry.current is version and entry.pending > 0)

    # ---- requests ----------------------------------------------------------------------------------------

    def reserve(self, name: str) -> AdapterEntry:
        """Counts one more request for `name`; AdapterNotFound unless it is READY. Starts reading it back
        from disk at once if its weights are not in memory, so that the wait overlaps the queueing."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                raise AdapterNotFound(name, "no adapter of that name is loaded")
            if entry.state is not AdapterState.READY or entry.current is None:
                raise AdapterNotFound(name, entry.unavailable())
            entry.pending += 1
            version = entry.current
            version.last_used = time.time()
            self.host.touch(version)
        self.fetch(entry)
        return entry

    def unreserve(self, entry: AdapterEntry) -> None:
        """One request for the entry has ended; the last one of an unloading name removes it."""
        retired: list[AdapterVersion] = []
        with self._lock:
            entry.pending -= 1
            if entry.pending == 0:
                if entry.state is AdapterState.UNLOADING and self._entries.get(entry.name) is entry:
                    retired = self._remove(entry)
                self.host.evict(self._protected)
        self._notify(retired)

    def fetch(self, entry: AdapterEntry) -> None:
        """Reads the entry's current version back from disk in the background, unless it is in memory."""
        with self._lock:
            version = entry.current
            if version is None or version.weights is not None or entry.fetching:
                return
            entry.fetching = True
        self._io.submit(self._fetch, entry, version)

    def _fetch(self, entry: AdapterEntry, version: AdapterVersion) -> None:
        retired: list[AdapterVersion] = []
        try:
            weights, fp, seconds = self._read(entry.name, version.path)
        except AdapterError as error:
            with self._lock:
                entry.fetching = False
                if entry.current is version:  # requests waiting for it fail: its files are gone or broken
                    entry.error, entry.current = error, None
                    if entry.state is not AdapterState.UNLOADING:
                        entry.state = AdapterState.REJECTED
                    retired = [self._retire(version)]
            self._notify(retired)
            return
        with self._lock:
            entry.fetching = False
            if version.retired:
                return
            if fp == version.fingerprint or entry.state is not AdapterState.READY:
                version.weights = weights
                self.host.add(version)
                self.host.evict(self._protected)
                return
        # The files changed since this version was loaded: what was read is a new version.
        self._commit(entry.name, version.path, entry.source, version.pinned, weights, fp, seconds)

    def close(self) -> None:
        self._io.shutdown(wait=False, cancel_futures=True)
