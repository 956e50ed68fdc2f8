"""Continuous batching: which sequences run in the next step."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from server.engine.block_manager import BlockManager
from server.engine.request import Sequence


@dataclass
class ScheduledStep:
    """The sequences of one engine step: new prompts to prefill and running ones to decode."""

    prefills: list[Sequence] = field(default_factory=list)
    decodes: list[Sequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def sequences(self) -> list[Sequence]:
        return self.prefills + self.decodes

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.decodes


class Scheduler:
    """Admits waiting sequences alongside running decodes within batch, token and KV limits.

    Running sequences are served first; when the KV cache runs out, the most recent arrival is
    preempted (its blocks freed, recomputed later) so older requests always make progress.
    """

    def __init__(self, blocks: BlockManager, max_batch_size: int, max_batched_tokens: int,
                 max_waiting: int) -> None:
        self.blocks = blocks
        self.max_batch_size = max_batch_size
        self.max_batched_tokens = max_batched_tokens
        self.max_waiting = max_waiting
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def can_add(self) -> bool:
        return len(self.waiting) < self.max_waiting

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        self._schedule_decodes(step)
        budget = self.max_batched_tokens - len(step.decodes)
        while self.waiting and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            if step.prefills and len(seq) > budget:
                break
            if not self.blocks.can_allocate(seq):
                break
            self.blocks.allocate(seq)
            self.waiting.popleft()
            self.running.append(seq)
            step.prefills.append(seq)
            budget -= len(seq)
        return step

    def _schedule_decodes(self, step: ScheduledStep) -> None:
        self.running.sort(key=lambda s: s.order)
        index = 0
        while index < len(self.running):
            seq = self.running[index]
            while not self.blocks.can_append(seq) and self.running[-1] is not seq:
                step.preempted.append(self._preempt(self.running.pop()))
            if self.blocks.can_append(seq):
                self.blocks.append(seq)
                step.decodes.append(seq)
                index += 1
            else:
                step.preempted.append(self._preempt(self.running.pop(index)))
        # Back to the front of the queue, oldest first.
        for seq in sorted(step.preempted, key=lambda s: s.order, reverse=True):
            self.waiting.appendleft(seq)

    def _preempt(self, seq: Sequence) -> Sequence:
        self.blocks.free(seq)
        return seq

    def finish(self, seq: Sequence) -> None:
        """Removes a finished sequence and frees its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        self.blocks.free(seq)

    def abort(self, request_id: str) -> Sequence | None:
        for queue in (self.waiting, self.running):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self.blocks.free(seq)
                    return seq
        return None
