"""Continuous batching: which sequences run in the next step."""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from server.engine.block_manager import BlockManager
from server.engine.errors import UnknownAdapter
from server.engine.request import Sequence
from server.engine.residency import AdapterLease, Binding

# Steps a request may be passed over for want of its adapter before it goes first and, if it needs a slot that
# running requests hold, admission of other adapters' requests pauses until one is free (no starvation).
AGE_LIMIT = 16


class AdapterAdmission(Protocol):
    """The device tier as the scheduler sees it (server.engine.residency.AdapterSlots)."""

    def start_step(self, decoding: bool) -> None: ...
    def ready(self, lease: AdapterLease) -> bool: ...
    def bind(self, lease: AdapterLease) -> Binding: ...


class Admission(enum.Enum):
    """What admitting one waiting request came to this step."""

    ADMITTED = "admitted"    # it holds its adapter (or needs none): it joins the batch
    LATER = "later"          # not this step (its adapter is being fetched or placed, or it failed)
    DRAIN = "drain"          # aged, and its adapter needs a slot running requests hold: admit no other adapter


@dataclass
class ScheduledStep:
    """The sequences of one engine step: prompts admitted now, prompts still being read (a chunk each) and
    running sequences to decode. A sequence samples a token when its step's tokens reach its end."""

    prefills: list[Sequence] = field(default_factory=list)     # admitted from the waiting queue this step
    continuing: list[Sequence] = field(default_factory=list)   # running, their prompt not yet read whole
    decodes: list[Sequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    failed: list[tuple[Sequence, Exception]] = field(default_factory=list)  # left the queue: adapter unservable
    chunks: dict[int, int] = field(default_factory=dict)   # id(seq) -> tokens it computes this step, if fewer
    #                                                         than all it has not cached

    @property
    def sequences(self) -> list[Sequence]:
        return self.prefills + self.continuing + self.decodes

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.continuing and not self.decodes

    def num_tokens(self, seq: Sequence) -> int:
        """Tokens `seq` computes this step (K/V written, positions num_cached onwards)."""
        return self.chunks.get(id(seq), len(seq) - seq.num_cached)


class Scheduler:
    """Admits waiting sequences alongside running decodes within batch, token and KV limits.

    Running sequences are served first; when the KV cache runs out, the most recent arrival is
    preempted (its blocks freed, recomputed later) so older requests always make progress.
    """

    def __init__(self, blocks: BlockManager, max_batch_size: int, max_batched_tokens: int,
                 adapters: AdapterAdmission | None = None, max_prefill_chunk: int | None = None) -> None:
        self.blocks = blocks
        self.adapters = adapters
        self.max_batch_size = max_batch_size
        self.max_batched_tokens = max_batched_tokens
        # Prompt tokens read per step, all prompts together (None: as many as the token budget allows).
        self.max_prefill_chunk = max_prefill_chunk or max_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._waited: dict[int, int] = {}   # id(seq) -> steps it was passed over for want of its adapter

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledStep:
        """Decodes first, then the next chunk of prompts being read (oldest first), then new prompts: prompt
        tokens share at most `max_prefill_chunk` a step, within `max_batched_tokens` with the decodes, so running
        streams keep their cadence while a long prompt is read over several steps."""
        step = ScheduledStep()
        reading = self._schedule_decodes(step)
        budget = min(self.max_prefill_chunk, self.max_batched_tokens - len(step.decodes))
        for seq in reading:
            if budget <= 0:
                break
            step.continuing.append(seq)
            budget -= self._take_chunk(step, seq, budget)
        if self.adapters is not None:
            self.adapters.start_step(bool(step.decodes))
        self._admit(step, budget)
        return step

    def _take_chunk(self, step: ScheduledStep, seq: Sequence, budget: int) -> int:
        """Schedules up to `budget` of the tokens `seq` has not cached; returns how many."""
        size = min(len(seq) - seq.num_cached, budget)
        if size < len(seq) - seq.num_cached:
            step.chunks[id(seq)] = size
        return size

    def _admit(self, step: ScheduledStep, budget: int) -> None:
        draining = False  # an aged request waits for a slot: admit only requests that need no new one
        for seq in self._admission_order():
            if len(self.running) >= self.max_batch_size or budget <= 0:
                break
            if not self.blocks.can_allocate(seq):
                break
            if draining and seq.adapter_lease is not None and seq.adapter_lease.binding is None:
                continue
            admission = self._bind_adapter(seq, step)
            if admission is Admission.DRAIN:
                draining = True
            if admission is not Admission.ADMITTED:
                continue
            self._waited.pop(id(seq), None)
            self.blocks.allocate(seq)
            self.waiting.remove(seq)
            self.running.append(seq)
            step.prefills.append(seq)
            budget -= self._take_chunk(step, seq, budget)

    def _admission_order(self) -> list[Sequence]:
        """Waiting requests whose adapter is on the device (or who need none) first, oldest first; requests
        passed over too long before everything."""
        if self.adapters is None:
            return list(self.waiting)
        ready, later = [], []
        for seq in self.waiting:
            lease = seq.adapter_lease
            (ready if lease is None or self.adapters.ready(lease) else later).append(seq)
        aged = [seq for seq in later if self._waited.get(id(seq), 0) > AGE_LIMIT]
        return aged + ready + [seq for seq in later if self._waited.get(id(seq), 0) <= AGE_LIMIT]

    def _bind_adapter(self, seq: Sequence, step: ScheduledStep) -> Admission:
        lease = seq.adapter_lease
        if lease is None or self.adapters is None:
            return Admission.ADMITTED
        try:
            outcome = self.adapters.bind(lease)
        except UnknownAdapter as error:
            self.waiting.remove(seq)
            self._waited.pop(id(seq), None)
            step.failed.append((seq, error))
            return Admission.LATER
        if outcome is Binding.BOUND and lease.binding is not None:
            seq.binding = lease.binding
            return Admission.ADMITTED
        waited = self._waited[id(seq)] = self._waited.get(id(seq), 0) + 1
        return Admission.DRAIN if outcome is Binding.NEEDS_SLOT and waited > AGE_LIMIT else Admission.LATER

    def _schedule_decodes(self, step: ScheduledStep) -> list[Sequence]:
        """Schedules the running sequences with one token to compute; returns those still reading their prompt."""
        self.running.sort(key=lambda s: s.order)
        reading: list[Sequence] = []
        index = 0
        while index < len(self.running):
            seq = self.running[index]
            while not self.blocks.can_append(seq) and self.running[-1] is not seq:
                step.preempted.append(self._preempt(self.running.pop()))
            if self.blocks.can_append(seq):
                self.blocks.append(seq)
                (step.decodes if len(seq) - seq.num_cached == 1 else reading).append(seq)
                index += 1
            else:
                step.preempted.append(self._preempt(self.running.pop(index)))
        # Back to the front of the queue, oldest first.
        for seq in sorted(step.preempted, key=lambda s: s.order, reverse=True):
            self.waiting.appendleft(seq)
        return reading   # preemption pops only sequences after the current one: these all still run

    def _preempt(self, seq: Sequence) -> Sequence:
        self.blocks.free(seq)
        return seq

    def finish(self, seq: Sequence) -> None:
        """Removes a finished sequence and frees its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        self.blocks.free(seq)

    def abort(self, seq: Sequence) -> bool:
        """Removes this very sequence (by identity: request ids are the client's and need not be unique) and frees
        its blocks; False if it is in neither queue."""
        for queue in (self.waiting, self.running):
            index = next((i for i, queued in enumerate(queue) if queued is seq), None)
            if index is not None:
                del queue[index]
                self._waited.pop(id(seq), None)
                self.blocks.free(seq)
                return True
        return False
