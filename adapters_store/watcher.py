"""Watches --adapters-dir by polling: new and changed subdirectories are loaded, removed ones unloaded.

Polling file metadata (no inotify dependency) costs a few stat calls per adapter per interval. A directory is
loaded only once its files have held still for one whole interval (same names, sizes and mtimes at two polls
in a row), so a copy in progress is not picked up; a load that fails anyway (a missing file, a truncated one)
is retried when the files change again.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from adapters_store.errors import AdapterError, AdapterNotFound
from adapters_store.registry import AdapterRegistry
from adapters_store.versions import Fingerprint, fingerprint

log = logging.getLogger("deltaserve.store")


class DirectoryWatcher:
    """Keeps the registry in step with the subdirectories of one directory, on a background thread.

    It manages only names that came from the directory: a name loaded through the admin API is left alone,
    and a directory unloaded through the API is not loaded again until its files change.
    """

    def __init__(self, registry: AdapterRegistry, directory: str | Path, interval: float = 0.5) -> None:
        self.registry = registry
        self.directory = Path(directory)
        self.interval = interval
        self._seen: dict[str, Fingerprint] = {}       # what the previous poll saw
        self._attempted: dict[str, Fingerprint] = {}  # the files each name was last loaded (or refused) from
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="deltaserve-adapter-watcher", daemon=True)

    def adopt_scan(self) -> None:
        """Takes the directory as it is now as already loaded (call right after the registry's scan)."""
        self._seen = self._list()
        self._attempted = dict(self._seen)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception:  # a surprise in one poll must not end the watching
                log.exception("polling %s failed", self.directory)

    def _list(self) -> dict[str, Fingerprint]:
        try:
            paths = [p for p in self.directory.iterdir() if p.is_dir() and not p.name.startswith(".")]
        except OSError:
            return {}
        listed = {}
        for path in paths:
            fp = fingerprint(path)
            if fp:  # an empty (or vanished) directory is not an adapter yet
                listed[path.name] = fp
        return listed

    def poll(self) -> None:
        """One look at the directory: loads what is new or changed and stable, unloads what disappeared."""
        now = self._list()
        for name, fp in sorted(now.items()):
            if self._seen.get(name) != fp or self._attempted.get(name) == fp:
                continue  # still changing (wait for it to hold still), or these exact files were already tried
            if self.registry.source_of(name) == "api":
                continue
            self._attempted[name] = fp
            try:
                self.registry.load(name, self.directory / name, source="dir")
            except AdapterError:
                pass  # recorded as the name's error; tried again when its files change
        for name in sorted(set(self._attempted) - set(now)):
            del self._attempted[name]
            if self.registry.source_of(name) != "dir":
                continue
            try:
                self.registry.unload(name)
            except AdapterNotFound:
                pass
        self._seen = now
