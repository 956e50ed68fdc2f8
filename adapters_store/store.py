"""The adapter store: named, validated adapters read from a directory, one subdirectory each."""

from __future__ import annotations

import logging
import threading
import time
from os import PathLike
from pathlib import Path

from adapters_store.errors import AdapterError, AdapterNotFound
from adapters_store.events import StoreListener
from adapters_store.loader import load_adapter
from adapters_store.spec import ModelSpec
from adapters_store.types import AdapterWeights

log = logging.getLogger("deltaserve.store")


class AdapterStore:
    """Adapters validated against one served model, by name. Safe to use from several threads.

    `scan()` makes every subdirectory of `adapters_dir` (hidden ones aside) an adapter named after the
    directory: it ends either in `adapters` or, with the reason, in `rejected`. One bad adapter never
    stops the others.
    """

    def __init__(self, spec: ModelSpec, adapters_dir: str | PathLike[str] | None = None,
                 listener: StoreListener | None = None) -> None:
        self.spec = spec
        self.listener = listener or StoreListener()
        self.adapters_dir = Path(adapters_dir) if adapters_dir is not None else None
        self._lock = threading.RLock()
        self._adapters: dict[str, AdapterWeights] = {}
        self._rejected: dict[str, AdapterError] = {}

    @property
    def adapters(self) -> dict[str, AdapterWeights]:
        """A snapshot of the served adapters by name."""
        with self._lock:
            return dict(self._adapters)

    @property
    def rejected(self) -> dict[str, AdapterError]:
        """A snapshot of the refused adapters by name, with why."""
        with self._lock:
            return dict(self._rejected)

    def scan(self) -> list[str]:
        """Loads every subdirectory of `adapters_dir`; returns the names now served from this scan.

        A name that fails moves to `rejected` (and stops being served); one that loads replaces any
        earlier version and leaves `rejected`.
        """
        if self.adapters_dir is None:
            return []
        if not self.adapters_dir.is_dir():
            raise FileNotFoundError(f"adapters directory {self.adapters_dir} does not exist or is not a directory")
        loaded = []
        for path in sorted(p for p in self.adapters_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:
                self.load(path.name, path)
            except AdapterError as exc:
                self._reject(path.name, exc)
                log.warning("rejected %s (from %s)", exc, path)
            except Exception as exc:  # one adapter's surprise must not stop the others from being served
                log.exception("unexpected error loading adapter %r from %s", path.name, path)
                self._reject(path.name, AdapterError("load_failed", f"{type(exc).__name__}: {exc}",
                                                     adapter=path.name, path=str(path)))
            else:
                loaded.append(path.name)
        log.info("scanned %s: %d adapter(s) served, %d rejected", self.adapters_dir, len(loaded),
                 len(self.rejected))
        return loaded

    def _reject(self, name: str, error: AdapterError) -> None:
        with self._lock:
            self._adapters.pop(name, None)
            self._rejected[name] = error

    def load(self, name: str, path: str | PathLike[str]) -> AdapterWeights:
        """Loads one adapter directory and serves it as `name` (replacing an earlier one of that name).

        Raises AdapterError and changes nothing if the adapter is refused.
        """
        start = time.perf_counter()
        try:
            weights = load_adapter(name, path, self.spec)  # slow (disk, validation): outside the lock
        except Exception as error:
            self.listener.on_load_failed(name, error.reason if isinstance(error, AdapterError) else "load_failed")
            raise
        self.listener.on_load(weights, time.perf_counter() - start)
        with self._lock:
            self._adapters[name] = weights
            self._rejected.pop(name, None)
        log.info("loaded adapter %r from %s: %s, %s, %d parameters (%.1f MiB)", name, weights.path,
                 weights.format, "+".join(weights.methods), weights.num_parameters, weights.nbytes / 2**20)
        return weights

    def get(self, name: str) -> AdapterWeights:
        """The served adapter `name`; AdapterNotFound (a KeyError) says why if it is not served."""
        with self._lock:
            weights = self._adapters.get(name)
            if weights is not None:
                return weights
            if name in self._rejected:
                error = self._rejected[name]
                raise AdapterNotFound(name, f"it was rejected ({error.reason}): {error.message}")
            raise AdapterNotFound(name, f"served adapters: {', '.join(sorted(self._adapters)) or 'none'}")

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._adapters)

    def remove(self, name: str) -> AdapterWeights | None:
        """Stops serving `name` (and forgets a rejection of it); returns what was served, if anything."""
        with self._lock:
            rejected = self._rejected.pop(name, None)
            weights = self._adapters.pop(name, None)
        if weights is None and rejected is None:
            raise AdapterNotFound(name)
        log.info("removed adapter %r", name)
        return weights

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._adapters

    def __len__(self) -> int:
        with self._lock:
            return len(self._adapters)
