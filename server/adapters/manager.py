"""The admin operations on adapters (the Adapters service's domain side): no gRPC here."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from adapters_store.errors import AdapterError, quote
from adapters_store.registry import AdapterRegistry
from adapters_store.versions import AdapterEntry, AdapterState, Tier
from server.adapters.errors import InvalidAdminRequest, PathNotAllowed, PinLimit
from server.engine.residency import AdapterSlots

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class AdapterStatus:
    """Everything GetAdapter tells about one adapter name and its current version."""

    name: str
    state: AdapterState
    version: int                 # 0: no version (loading or rejected)
    path: str
    source: str                  # "dir" (--adapters-dir) or "api" (LoadAdapter)
    pinned: bool
    format: str
    methods: tuple[str, ...]
    ranks: tuple[int, ...]       # distinct ranks: LoRA r, bottleneck width, prefix length
    targets: tuple[str, ...]     # what it modifies: linear names (q_proj, ...), attn/ffn adapters, the prefix
    num_parameters: int
    nbytes: int
    tier: Tier | None            # where its current version's weights are
    loaded_at: float             # unix time
    load_seconds: float
    last_used: float             # unix time; 0 = never
    in_flight: int               # requests accepted and not ended
    draining_versions: int       # older versions still finishing requests
    error: AdapterError | None   # why its last load failed, if it did
    nonfinite_outputs: int = 0   # requests of the current version that failed for non-finite logits


class AdapterManager:
    """LoadAdapter / UnloadAdapter / ListAdapters / GetAdapter over the registry and the device slots.

    LoadAdapter reads only directories under `load_roots` (--adapters-load-root and --adapters-dir): a path is
    resolved (symlinks and `..` included) before the check, and a relative path is taken under the first root.
    """

    def __init__(self, registry: AdapterRegistry, slots: AdapterSlots, load_roots: Sequence[str | Path]) -> None:
        self.registry = registry
        self.slots = slots
        self.load_roots = [Path(root).resolve() for root in load_roots if root]

    def load(self, name: str, path: str, pinned: bool = False) -> AdapterStatus:
        """Reads, validates and serves `path` as `name` (a new version if the name is served); blocks until done.

        Raises InvalidAdminRequest, PathNotAllowed, PinLimit, or AdapterError when the files are refused.
        """
        if not NAME.fullmatch(name):
            raise InvalidAdminRequest(f"adapter name {quote(name)} must be 1 to 128 letters, digits, '.', '_' or '-', "
                                      "starting with a letter or digit")
        directory = self.allowed_path(path)
        if pinned and self.registry.pinned(exclude=name) >= self.slots.num_slots - 1:
            raise PinLimit(f"pinning {name!r} would pin every device slot but none ({self.slots.num_slots} slots); "
                           "unpin another adapter or raise --max-device-adapters")
        self.registry.load(name, directory, pinned=pinned, source="api")
        return self.get(name)

    def allowed_path(self, path: str) -> Path:
        if not path:
            raise InvalidAdminRequest("path is empty")
        if not self.load_roots:
            raise PathNotAllowed("LoadAdapter is turned off: start the server with --adapters-load-root (or "
                                 "--adapters-dir) to say where adapters may be loaded from")
        candidate = Path(path)
        if not candidate.is_absolute():
            candidate = self.load_roots[0] / candidate
        resolved = candidate.resolve()
        if any(resolved != root and resolved.is_relative_to(root) for root in self.load_roots):
            return resolved
        roots = ", ".join(str(root) for root in self.load_roots)
        raise PathNotAllowed(f"{quote(str(path), 256)} is not under an allowed adapter root ({roots})")

    def unload(self, name: str) -> AdapterStatus:
        """Stops new requests for `name` (NOT_FOUND from now on); it is gone once its in-flight requests end.

        Raises AdapterNotFound (a KeyError) for a name that is not loaded.
        """
        entry = self.registry.entry(name)
        before = self._status(entry)
        state = self.registry.unload(name)
        return replace(before, state=state, in_flight=entry.pending)

    def get(self, name: str) -> AdapterStatus:
        return self._status(self.registry.entry(name))

    def list(self) -> list[AdapterStatus]:
        draining = self.slots.draining()
        return [self._status(entry, draining) for entry in self.registry.entries()]

    def _status(self, entry: AdapterEntry, draining: dict[str, int] | None = None) -> AdapterStatus:
        if draining is None:
            draining = self.slots.draining()
        v = entry.current
        return AdapterStatus(
            name=entry.name, state=entry.state, version=v.version if v else 0, path=entry.path,
            source=entry.source, pinned=bool(v and v.pinned), format=v.format if v else "",
            methods=v.methods if v else (), ranks=v.ranks if v else (), targets=v.targets if v else (),
            num_parameters=v.num_parameters if v else 0, nbytes=v.nbytes if v else 0, tier=v.tier if v else None,
            loaded_at=v.loaded_at if v else 0.0, load_seconds=v.load_seconds if v else 0.0,
            last_used=v.last_used if v else 0.0, in_flight=entry.pending,
            draining_versions=draining.get(entry.name, 0), error=entry.error,
            nonfinite_outputs=v.nonfinite_outputs if v else 0)
