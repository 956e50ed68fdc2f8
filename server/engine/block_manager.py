"""KV cache blocks: which blocks are free, which sequence holds which."""

from __future__ import annotations

from collections import deque

from server.engine.request import Sequence


class BlockManager:
    """Hands out fixed-size KV blocks; `can_x()` says whether `x()` would succeed."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _missing(self, seq: Sequence) -> int:
        # Every step writes K/V for all of the sequence's tokens not yet cached.
        return max(0, self.blocks_for(len(seq)) - len(seq.block_table))

    def can_allocate(self, seq: Sequence) -> bool:
        return self._missing(seq) <= self.num_free

    def allocate(self, seq: Sequence) -> None:
        missing = self._missing(seq)
        if missing > self.num_free:
            raise RuntimeError(f"{seq.request_id}: {missing} KV blocks needed, {self.num_free} free")
        seq.block_table.extend(self._free.popleft() for _ in range(missing))

    # Decode needs at most one new block per step: the same check, named for the caller's intent.
    can_append = can_allocate
    append = allocate

    def free(self, seq: Sequence) -> None:
        self._free.extend(seq.block_table)
        seq.block_table = []
        seq.num_cached = 0
