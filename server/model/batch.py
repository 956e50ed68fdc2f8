"""The explicit per-step batch descriptor handed to the model's forward.

The runner builds one per engine step. Tokens of all scheduled sequences are laid out flat and
grouped by adapter, so that each adapter's rows form one contiguous segment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from server.kernels.interface import DecodeVisibility


@dataclass
class AdapterSegments:
    """Rows of the flat token batch grouped by adapter slot (-1 = the base model)."""

    bounds: list[int]        # [num_segments + 1] row offsets; segment s is rows bounds[s]:bounds[s+1]
    slots: list[int]         # [num_segments] device adapter slot per segment, -1 for base rows

    @property
    def num_segments(self) -> int:
        return len(self.slots)

    @property
    def has_adapters(self) -> bool:
        return any(slot >= 0 for slot in self.slots)


@dataclass
class BatchDescriptor:
    """Everything one forward needs: flat tokens, KV placement, attention groups and adapter segments."""

    input_ids: torch.Tensor      # [num_tokens]
    positions: torch.Tensor      # [num_tokens] RoPE position of each token (shifted by an adapter's offset)
    slot_mapping: torch.Tensor   # [num_tokens] flat KV cache slot (block * block_size + offset)
    logits_indices: torch.Tensor  # [num_seqs] row of each sequence's last token
    # Prefill rows attend causally to their own new tokens and, for a later chunk of a prompt, to the
    # tokens of its earlier chunks (prefill_context).
    prefill_ranges: list[tuple[int, int]]  # [num_prefill] (first row, number of rows)
    # Decode sequences contribute one row each and attend to their cached context.
    decode_rows: torch.Tensor          # [num_decode] row index of each decode sequence
    decode_block_tables: torch.Tensor  # [num_decode, max_blocks] KV block ids (padded with 0)
    decode_visibility: DecodeVisibility  # which table positions each decode row attends to (shared blocks, own)
    block_size: int
    segments: AdapterSegments
    decode_is_all: bool = field(default=False)  # every row is a decode row (no gather needed)
    # Per-step state of each delta method in use, keyed by method name (filled by DeltaSet.prepare).
    method_state: dict[str, Any] = field(default_factory=dict)
    # [num_prefill] each None (nothing cached before the rows) or [context + rows] flat KV slots of every token the
    # sequence sees up to the chunk's last: shared blocks' tokens, cached ones, this step's (written before
    # attention reads them).
    prefill_context: list[torch.Tensor | None] = field(default_factory=list)
    # [num_prefill] each None or [rows, context + rows] True = attend: causal after the context (built once a step,
    # not once a layer).
    prefill_masks: list[torch.Tensor | None] = field(default_factory=list)
    # [num_tokens] int32 adapter slot of every row (-1 = base), set only on a captured decode step: the delta
    # methods plan every row as its own segment from it on the device (server/engine/graphs.py).
    row_slots: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_decode(self) -> int:
        return int(self.decode_rows.shape[0])
