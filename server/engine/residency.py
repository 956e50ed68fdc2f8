"""Residency, the device tier: which adapter version holds which preallocated slot, with reference counts and LRU.

A request reserves its adapter's name when it is submitted (`acquire`: NOT_FOUND if the name is not served)
and is bound to the name's current version and a slot when the scheduler admits it (`bind`), on the engine
thread, between two steps. Slots are keyed by (name, version): after a reload, requests already running keep
the old version's slot to their last token while new ones get the new version. A slot in use is never
evicted; idle slots are reused least recently used first, pinned versions' never. Placing weights into a slot
is a copy on the engine thread (delta methods are not safe to change during a forward); while other requests are
decoding, a step spends at most `place_seconds_per_step` on it (at least one placement), so a burst of first
requests cannot stall running streams. Binding yields a plain `AdapterBinding` record (slot, version, position
offset, the adapter's shared KV blocks) that the scheduler, the KV blocks and the runner read; an adapter whose
placement asks for shared keys/values (prefix tuning) has them written once into KV blocks pinned while it is
resident.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from adapters_store.errors import AdapterNotFound
from adapters_store.registry import AdapterRegistry
from adapters_store.versions import AdapterEntry, AdapterVersion
from server.deltas.base import Placement
from server.deltas.deltaset import DeltaSet
from server.engine.binding import AdapterBinding
from server.engine.block_manager import BlockManager
from server.engine.errors import Overloaded, UnknownAdapter
from server.model.attention import PagedKVCache

# Time one engine step may spend copying weights into slots while requests are decoding (at least one placement
# per step). An r=8 q/v adapter on the default model takes about 2 ms (7 ms the first time a slot is written).
PLACE_SECONDS_PER_STEP = 0.005


class Binding(enum.Enum):
    """What `bind` could do for a request now."""

    BOUND = "bound"            # it holds a slot with its version's weights
    NEEDS_FETCH = "fetch"      # its weights are being read back from disk
    NEEDS_SLOT = "slot"        # every slot is held by running requests (or pinned)
    NEEDS_BLOCKS = "blocks"    # its shared keys/values need more free KV blocks than there are now
    STEP_BUDGET = "budget"     # this step has spent its time on placements already


class SharedKV:
    """Pins KV blocks for an adapter's shared keys/values and writes them there (the engine thread's blocks)."""

    def __init__(self, blocks: BlockManager, cache: PagedKVCache) -> None:
        self.blocks = blocks
        self.cache = cache

    def can_hold_tokens(self, num_tokens: int) -> bool:
        return self.blocks.can_pin(num_tokens)

    def hold(self, placement: Placement) -> tuple[int, ...]:
        if placement.shared_keys is None or placement.shared_values is None:
            return ()
        blocks = self.blocks.pin(placement.shared_tokens)
        self.cache.write_blocks(blocks, placement.shared_keys, placement.shared_values)
        return tuple(blocks)

    def release(self, blocks: tuple[int, ...]) -> None:
        self.blocks.unpin(blocks)


@dataclass(eq=False)
class AdapterLease:
    """One request's hold on an adapter: the name from submission; the version and binding from admission."""

    entry: AdapterEntry
    version: AdapterVersion | None = None
    binding: AdapterBinding | None = None

    @property
    def slot(self) -> int:
        return self.binding.slot if self.binding is not None else -1


class AdapterSlots:
    """Maps adapter versions to device slots for the engine (the `AdapterResolver`) and the scheduler."""

    def __init__(self, registry: AdapterRegistry, deltas: DeltaSet, shared_kv: SharedKV,
                 place_seconds_per_step: float = PLACE_SECONDS_PER_STEP) -> None:
        self.registry = registry
        self.deltas = deltas
        self.shared_kv = shared_kv
        self.num_slots = deltas.limits.num_slots
        self.place_seconds_per_step = place_seconds_per_step
        self._lock = threading.Lock()
        self._slot_of: dict[tuple[str, int], int] = {}
        self._version: list[AdapterVersion | None] = [None] * self.num_slots
        self._methods: list[tuple[str, ...]] = [()] * self.num_slots
        self._binding: list[AdapterBinding | None] = [None] * self.num_slots
        self._refs = [0] * self.num_slots
        self._idle: OrderedDict[int, None] = OrderedDict()   # resident, unreferenced; oldest first
        self._free = list(range(self.num_slots - 1, -1, -1))
        self._to_clear: list[int] = []                       # retired while idle: cleared on the engine thread
        self._placing: float | None = 0.0   # seconds spent placing this step; None: no limit this step
        self._direct: dict[int, list[AdapterLease]] = {}   # leases handed out by `acquire`, by slot
        # shared tokens of versions whose keys/values found too few free blocks: not placed again (a copy, perhaps an
        # eviction) until that many fit
        self._blocked: dict[int, int] = {}
        registry.on_retire(self._retired)

    # ---- any thread ------------------------------------------------------------------------------------

    def reserve(self, adapter_id: str) -> AdapterLease:
        """Reserves the adapter for one request; UnknownAdapter if it is not served (or being unloaded)."""
        try:
            return AdapterLease(self.registry.reserve(adapter_id))
        except AdapterNotFound as error:
            raise UnknownAdapter(str(error)) from error

    def acquire(self, adapter_id: str, timeout: float = 60.0) -> AdapterBinding:
        """Reserves and binds the adapter at once and returns its binding, for code that drives the runner itself
        (tests, benchmarks); give it back with `release(binding)`. Not for use while the engine runs.
        Raises UnknownAdapter, or Overloaded when every slot is held."""
        lease = self.reserve(adapter_id)
        deadline = time.monotonic() + timeout
        while (outcome := self.bind(lease)) is not Binding.BOUND:
            self._placing = None
            if outcome is Binding.NEEDS_SLOT or time.monotonic() > deadline:
                self.release(lease)
                raise Overloaded(f"adapter {adapter_id!r} cannot be placed now ({outcome.value})")
            time.sleep(0.005)
        self._direct.setdefault(lease.slot, []).append(lease)
        assert lease.binding is not None
        return lease.binding

    def resident(self) -> dict[str, int]:
        """Name -> slot of every current (not retired) version on the device."""
        with self._lock:
            return {name: slot for (name, _), slot in self._slot_of.items()
                    if (v := self._version[slot]) is not None and not v.retired}

    def draining(self) -> dict[str, int]:
        """Name -> how many of its retired versions still hold a slot for running requests."""
        counts: dict[str, int] = {}
        with self._lock:
            for slot, v in enumerate(self._version):
                if v is not None and v.retired and self._refs[slot] > 0:
                    counts[v.name] = counts.get(v.name, 0) + 1
        return counts

    # ---- the engine thread -------------------------------------------------------------------------------

    def start_step(self, decoding: bool = True) -> None:
        """Clears slots of versions retired while idle, and opens this step's placement budget (no limit when
        no request is decoding: nothing waits on the step then)."""
        with self._lock:
            while self._to_clear:
                self._clear(self._to_clear.pop())
        self._placing = 0.0 if decoding else None

    def ready(self, lease: AdapterLease) -> bool:
        """Whether the request could run now without copying weights (bound, or its version is resident)."""
        if lease.binding is not None:
            return True
        version = lease.entry.current
        return version is not None and (lease.entry.name, version.version) in self._slot_of

    def bind(self, lease: AdapterLease) -> Binding:
        """Binds the request to its name's current version in a slot, placing it there if need be.

        Raises UnknownAdapter if the name has nothing left to serve (its files were refused when read back).
        """
        if lease.binding is not None:
            return Binding.BOUND
        entry = lease.entry
        version = entry.current
        if version is None:
            raise UnknownAdapter(f"adapter {entry.name!r} cannot be served: {entry.unavailable()}")
        with self._lock:
            slot = self._slot_of.get((entry.name, version.version))
            if slot is None:
                outcome, slot = self._place(entry, version)
                if slot is None:
                    return outcome
            self._refs[slot] += 1
            self._idle.pop(slot, None)
        lease.version, lease.binding = version, self._binding[slot]
        return Binding.BOUND

    def mark_untrusted(self, lease: AdapterLease) -> None:
        """A request of this lease's version produced non-finite logits: counted on the version (GetAdapter)."""
        if lease.version is not None:
            lease.version.nonfinite_outputs += 1

    def release(self, lease: AdapterLease | AdapterBinding) -> None:
        """The request ended (or was refused after `reserve`): gives back its slot and its reservation.
        A binding is one from `acquire` (the base model's: nothing to give back)."""
        if isinstance(lease, AdapterBinding):
            if lease.slot < 0:
                return
            lease = self._direct[lease.slot].pop()
        slot, lease.binding = lease.slot, None
        if slot >= 0:
            with self._lock:
                self._refs[slot] -= 1
                if self._refs[slot] == 0:
                    version = self._version[slot]
                    if version is not None and version.retired:
                        self._clear(slot)
                    else:
                        self._idle[slot] = None
        self.registry.unreserve(lease.entry)

    def _place(self, entry: AdapterEntry, version: AdapterVersion) -> tuple[Binding, int | None]:
        weights = version.weights
        if weights is None:
            self.registry.fetch(entry)
            return Binding.NEEDS_FETCH, None
        if self._placing is not None and self._placing >= self.place_seconds_per_step:
            return Binding.STEP_BUDGET, None
        if version.uid in self._blocked and not self.shared_kv.can_hold_tokens(self._blocked[version.uid]):
            return Binding.NEEDS_BLOCKS, None
        slot = self._take_slot()
        if slot is None:
            return Binding.NEEDS_SLOT, None
        start = time.perf_counter()
        placement = self.deltas.place(slot, weights.parts)   # a copy, between two steps
        if not self.shared_kv.can_hold_tokens(placement.shared_tokens):
            self.deltas.clear(slot, weights.parts)
            self._free.append(slot)
            self._blocked[version.uid] = placement.shared_tokens
            return Binding.NEEDS_BLOCKS, None
        self._blocked.pop(version.uid, None)
        shared = self.shared_kv.hold(placement)
        if self._placing is not None:
            self._placing += time.perf_counter() - start
        self._version[slot], self._methods[slot] = version, tuple(weights.parts)
        self._binding[slot] = AdapterBinding(slot, version.version, b"%d" % version.uid, placement.position_offset,
                                             shared, placement.shared_tokens)
        self._slot_of[(version.name, version.version)] = slot
        version.device_slot = slot
        return Binding.BOUND, slot

    def _take_slot(self) -> int | None:
        if self._free:
            return self._free.pop()
        for slot in self._idle:
            version = self._version[slot]
            if version is None or not version.pinned or version.retired:
                del self._idle[slot]
                self._clear(slot, free=False)
                return slot
        return None

    def _clear(self, slot: int, free: bool = True) -> None:
        version = self._version[slot]
        if version is not None:
            if self._slot_of.get((version.name, version.version)) == slot:
                del self._slot_of[(version.name, version.version)]
            version.device_slot = -1
            self.deltas.clear(slot, self._methods[slot])
        binding = self._binding[slot]
        if binding is not None:
            self.shared_kv.release(binding.shared_blocks)
        self._version[slot], self._methods[slot], self._binding[slot] = None, (), None
        self._idle.pop(slot, None)
        if free:
            self._free.append(slot)

    def _retired(self, version: AdapterVersion) -> None:
        """Registry callback (any thread): an idle slot of a retired version is cleared at the next step."""
        with self._lock:
            self._blocked.pop(version.uid, None)
            slot = self._slot_of.pop((version.name, version.version), None)
            if slot is not None and self._refs[slot] == 0 and slot in self._idle:
                del self._idle[slot]
                self._to_clear.append(slot)
