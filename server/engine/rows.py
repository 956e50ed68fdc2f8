"""The flat rows of one engine step as the runner lays them out, before they become tensors."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StepRows:
    """One step's rows, grouped by adapter slot; decode rows also keep what their attention reads."""

    ids: list[int] = field(default_factory=list)             # [num_tokens]
    positions: list[int] = field(default_factory=list)       # [num_tokens]
    slots: list[int] = field(default_factory=list)           # [num_tokens] flat KV slot
    token_slots: list[int] = field(default_factory=list)     # [num_tokens] adapter slot
    logits_rows: list[int] = field(default_factory=list)     # [num_sampling]
    prefill_ranges: list[tuple[int, int]] = field(default_factory=list)   # [num_prefill] (first row, rows)
    context_slots: list[list[int]] = field(default_factory=list)          # [num_prefill] each [context + rows]
    decode_rows: list[int] = field(default_factory=list)     # [num_decode]
    tables: list[list[int]] = field(default_factory=list)    # [num_decode] block tables
    lengths: list[int] = field(default_factory=list)         # [num_decode] tokens cached after this step
    shared_tokens: list[int] = field(default_factory=list)   # [num_decode] tokens of shared blocks in front

    @property
    def decode_only(self) -> bool:
        return not self.prefill_ranges


def own_starts(shared_tokens: list[int], block_size: int) -> list[int]:
    """Where each decode row's own tokens start in its block table: after its shared blocks, whose last block may
    be part empty."""
    return [-(-p // block_size) * block_size for p in shared_tokens]
