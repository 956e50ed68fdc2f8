"""Builds the batch descriptor for a scheduled step and runs the model on it."""

from __future__ import annotations

import torch

from server.deltas.deltaset import DeltaSet
from server.engine.request import Sequence
from server.engine.scheduler import ScheduledStep
from server.model.attention import PagedKVCache
from server.model.batch import AdapterSegments, BatchDescriptor
from server.model.llama import CausalLM


class ModelRunner:
    """Owns the frozen model and its KV cache; one `run` per engine step."""

    def __init__(self, model: CausalLM, kv_cache: PagedKVCache, device: torch.device,
                 deltas: DeltaSet | None = None) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.deltas = deltas
        self.block_size = kv_cache.block_size

    def run(self, step: ScheduledStep) -> tuple[list[Sequence], torch.Tensor]:
        """Returns the step's sequences in batch order and their next-token logits [num_seqs, vocab]."""
        seqs, batch = self.prepare(step)
        if self.deltas is not None:
            self.deltas.prepare(batch)
        logits = self.model(batch, self.kv_cache)
        for seq in seqs:
            seq.num_cached = len(seq)
        return seqs, logits

    def prepare(self, step: ScheduledStep) -> tuple[list[Sequence], BatchDescriptor]:
        # Sorting by adapter slot makes each adapter's rows one contiguous segment.
        seqs = sorted(step.sequences, key=lambda s: s.adapter_slot)
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        token_slots: list[int] = []
        logits_rows: list[int] = []
        prefill_ranges: list[tuple[int, int]] = []
        decode_rows: list[int] = []
        tables: list[list[int]] = []
        lengths: list[int] = []
        prefix_lengths: list[int] = []   # [num_decode] tokens of joined prefix blocks in front of each row
        for seq in seqs:
            start, total = len(ids), len(seq)
            offset = self.deltas.position_offset(seq.adapter_slot) if self.deltas is not None else 0
            if seq.num_cached == 0:
                new_ids, first = seq.all_ids, 0
                prefill_ranges.append((start, total))
            else:
                new_ids = [seq.output_ids[-1] if seq.output_ids else seq.prompt_ids[-1]]
                first = total - 1
                decode_rows.append(start)
                prefix = self.deltas.kv_prefix(seq.adapter_slot) if self.deltas is not None else None
                tables.append(prefix[0] + seq.block_table if prefix else seq.block_table)
                prefix_lengths.append(prefix[1] if prefix else 0)
                lengths.append(total)
            ids.extend(new_ids)
            pos = range(first, total)
            positions.extend(p + offset for p in pos)
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
            token_slots.extend([seq.adapter_slot] * len(new_ids))
            logits_rows.append(len(ids) - 1)
        batch = BatchDescriptor(
            input_ids=self._tensor(ids),
            positions=self._tensor(positions),
            slot_mapping=self._tensor(slots),
            logits_indices=self._tensor(logits_rows),
            prefill_ranges=prefill_ranges,
            decode_rows=self._tensor(decode_rows),
            decode_block_tables=self._block_tables(tables),
            decode_mask=self._decode_mask(tables, lengths, prefix_lengths),
            block_size=bs,
            segments=self._segments(seqs, token_slots),
            decode_is_all=not prefill_ranges,
        )
        return seqs, batch

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _block_tables(self, tables: list[list[int]]) -> torch.Tensor:
        width = max((len(t) for t in tables), default=0)
        return self._tensor([t + [0] * (width - len(t)) for t in tables]).view(len(tables), width)

    def _decode_mask(self, tables: list[list[int]], lengths: list[int], prefix_lengths: list[int]) -> torch.Tensor:
        bs = self.block_size
        width = max((len(t) for t in tables), default=0) * bs
        cols = torch.arange(width, device=self.device).unsqueeze(0)          # [1, L]
        prefix = self._tensor(prefix_lengths).unsqueeze(1)                   # [B, 1]
        # A row's own tokens start after its prefix blocks (whose last block may be part empty).
        own = self._tensor([-(-p // bs) * bs for p in prefix_lengths]).unsqueeze(1)
        mask = (cols < prefix) | ((cols >= own) & (cols < own + self._tensor(lengths).unsqueeze(1)))
        return mask.view(len(lengths), 1, 1, width)

    def _segments(self, seqs: list[Sequence], token_slots: list[int]) -> AdapterSegments:
        bounds, seg_slots = [0], []
        for row, slot in enumerate(token_slots):
            if not seg_slots or slot != seg_slots[-1]:
                if seg_slots:
                    bounds.append(row)
                seg_slots.append(slot)
        bounds.append(len(token_slots))
        return AdapterSegments(bounds=bounds, slots=seg_slots, token_slots=self._tensor(token_slots),
                               seq_slots=self._tensor([s.adapter_slot for s in seqs]))
