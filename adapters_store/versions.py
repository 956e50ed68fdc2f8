"""Adapter versions: what one load of one adapter directory produced, and the name that serves it.

A name (`AdapterEntry`) serves one current version at a time; every load under that name makes a new
version with the next number. A request is bound to the version current when it is admitted and keeps it
to its last token, so older versions may still be finishing requests (on the device) while the new one
serves new requests.
"""

from __future__ import annotations

import enum
import itertools
import os
import time
from dataclasses import dataclass, field
from typing import Any

from adapters_store.errors import AdapterError
from adapters_store.types import AdapterWeights

# Process-wide identity of a load: version numbers restart when a name is unloaded and loaded again, these never.
_load_ids = itertools.count(1)

# (file name, size, mtime in ns) of every regular file directly in an adapter directory, sorted.
Fingerprint = tuple[tuple[str, int, int], ...]


class AdapterState(enum.Enum):
    """Where a name stands. UNLOADED only ever appears in answers (the name is gone)."""

    LOADING = "loading"      # its first load is under way: not servable yet
    READY = "ready"          # serving its current version
    UNLOADING = "unloading"  # refuses new requests; gone once its in-flight requests end
    REJECTED = "rejected"    # its files were refused (see the error); never served
    UNLOADED = "unloaded"


class Tier(enum.Enum):
    """Where a version's weights are: in a device slot, in host memory, or only in their files."""

    DEVICE = "device"
    HOST = "host"
    DISK = "disk"


def fingerprint(directory: str | os.PathLike[str]) -> Fingerprint | None:
    """The directory's files as (name, size, mtime_ns); None if it is not a readable directory.

    Two equal fingerprints taken some time apart say the files held still in between (a copy in progress
    changes sizes or mtimes); a fingerprint that differs from a version's says its files changed.
    """
    files = []
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.is_file():
                    stat = entry.stat()
                    files.append((entry.name, stat.st_size, stat.st_mtime_ns))
    except OSError:
        return None
    return tuple(sorted(files))


def _part_shape(part: Any) -> tuple[set[int], set[str]]:
    """Ranks and targets of one method's part, read by duck typing so that new part types need no change here."""
    ranks: set[int] = set()
    targets: set[str] = set()
    modules = getattr(part, "modules", None)
    if isinstance(modules, dict):  # LoRA: module path -> module with .rank
        for path, module in modules.items():
            ranks.add(int(module.rank))
            targets.add(path.rsplit(".", 1)[-1])
    elif isinstance(modules, list):  # bottleneck: modules with .rank and .site
        for module in modules:
            ranks.add(int(module.rank))
            targets.add(f"{getattr(module, 'site', 'block')}_adapter")
    if hasattr(part, "num_virtual_tokens"):  # prefix: its length
        ranks.add(int(part.num_virtual_tokens))
        targets.add("attention_prefix")
    return ranks, targets


@dataclass(eq=False)
class AdapterVersion:
    """One load of one adapter: its description, and its weights while they are held in host memory.

    `weights` (the host tier), `last_used`, `device_slot` and `retired` change over its life; the rest does not.
    """

    name: str
    version: int
    path: str
    format: str
    methods: tuple[str, ...]
    ranks: tuple[int, ...]
    targets: tuple[str, ...]
    num_parameters: int
    nbytes: int
    fingerprint: Fingerprint
    pinned: bool
    loaded_at: float              # unix time the load finished
    load_seconds: float           # how long reading and validating took
    weights: AdapterWeights | None = None
    last_used: float = 0.0        # unix time a request last asked for it; 0 = never
    device_slot: int = -1         # set by the device tier while the version sits in a slot
    retired: bool = False         # superseded or unloaded: never given to a new request again
    nonfinite_outputs: int = 0    # requests it failed because their logits were not finite (engine thread writes)
    uid: int = field(default_factory=lambda: next(_load_ids))   # unique for the process's life (prefix-cache keys)

    @classmethod
    def of(cls, weights: AdapterWeights, version: int, fp: Fingerprint, pinned: bool,
           seconds: float) -> AdapterVersion:
        ranks: set[int] = set()
        targets: set[str] = set()
        for part in weights.parts.values():
            part_ranks, part_targets = _part_shape(part)
            ranks |= part_ranks
            targets |= part_targets
        return cls(name=weights.name, version=version, path=str(weights.path), format=weights.format,
                   methods=tuple(weights.methods), ranks=tuple(sorted(ranks)), targets=tuple(sorted(targets)),
                   num_parameters=weights.num_parameters, nbytes=weights.nbytes, fingerprint=fp, pinned=pinned,
                   loaded_at=time.time(), load_seconds=seconds, weights=weights)

    @property
    def parts(self) -> dict[str, Any]:
        """The weights' method parts while they are in host memory (for tools and tests: the engine reads
        slots). LookupError when the version is on disk only."""
        weights = self.weights
        if weights is None:
            raise LookupError(f"adapter {self.name!r} version {self.version} is not in host memory")
        return weights.parts

    @property
    def tier(self) -> Tier:
        if self.device_slot >= 0:
            return Tier.DEVICE
        return Tier.HOST if self.weights is not None else Tier.DISK


@dataclass(eq=False)
class AdapterEntry:
    """A served (or refused) adapter name: its current version, state and the requests it has in flight."""

    name: str
    path: str
    source: str                   # "dir": found in --adapters-dir; "api": LoadAdapter
    state: AdapterState = AdapterState.LOADING
    current: AdapterVersion | None = None
    error: AdapterError | None = None   # the last failed load; a current version, if any, still serves
    pending: int = 0              # requests accepted and not yet ended
    fetching: bool = False        # its current version's weights are being read back from disk
    created: float = field(default_factory=time.time)

    def unavailable(self) -> str:
        """Why a request for this name cannot be served now (for NOT_FOUND details)."""
        if self.state is AdapterState.UNLOADING:
            return "it is being unloaded"
        if self.state is AdapterState.LOADING:
            return "it is still loading"
        if self.error is not None:
            return f"it was rejected ({self.error.reason}): {self.error.message}"
        return "it has no servable version"
