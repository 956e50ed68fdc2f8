"""Builds the batch descriptor for a scheduled step and runs the model on it."""

from __future__ import annotations

import torch

from server.deltas.deltaset import DeltaSet
from server.engine.graphs import DecodeGraphs
from server.engine.request import Sequence
from server.engine.rows import StepRows, own_starts
from server.engine.scheduler import ScheduledStep
from server.kernels.interface import DecodeVisibility
from server.model.attention import PagedKVCache
from server.model.batch import AdapterSegments, BatchDescriptor
from server.model.llama import CausalLM


class ModelRunner:
    """Owns the frozen model and its KV cache; one `run` per engine step."""

    def __init__(self, model: CausalLM, kv_cache: PagedKVCache, device: torch.device,
                 deltas: DeltaSet | None = None, graphs: DecodeGraphs | None = None) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.deltas = deltas
        self.graphs = graphs   # captured decode steps (CUDA graphs), or None: every step runs eagerly
        self.block_size = kv_cache.block_size

    def run(self, step: ScheduledStep) -> tuple[list[Sequence], torch.Tensor]:
        """Returns the step's sequences that sample a token (those whose tokens this step reach their end), in
        batch order, and their next-token logits [num_sampling, vocab] (valid until the next step)."""
        seqs, rows = self.lay_out(step)
        if self.graphs is not None and rows.decode_only and self.graphs.fits(rows):
            logits = self.graphs.run(rows)
        else:
            batch = self.describe(rows)
            if self.deltas is not None:
                self.deltas.prepare(batch)
            logits = self.model(batch, self.kv_cache)
        sampling = []
        for seq in seqs:
            seq.num_cached += step.num_tokens(seq)
            if seq.num_cached == len(seq):
                sampling.append(seq)
        return sampling, logits

    def lay_out(self, step: ScheduledStep) -> tuple[list[Sequence], StepRows]:
        # Sorting by adapter slot makes each adapter's rows one contiguous segment.
        seqs = sorted(step.sequences, key=lambda s: s.adapter_slot)
        rows = StepRows()
        for seq in seqs:
            self._add(rows, seq, step.num_tokens(seq))
        return seqs, rows

    def describe(self, rows: StepRows) -> BatchDescriptor:
        return BatchDescriptor(
            input_ids=self._tensor(rows.ids),
            positions=self._tensor(rows.positions),
            slot_mapping=self._tensor(rows.slots),
            logits_indices=self._tensor(rows.logits_rows),
            prefill_ranges=rows.prefill_ranges,
            decode_rows=self._tensor(rows.decode_rows),
            decode_block_tables=self._block_tables(rows.tables),
            decode_visibility=self._visibility(rows.lengths, rows.shared_tokens),
            block_size=self.block_size,
            segments=self._segments(rows.token_slots),
            decode_is_all=rows.decode_only,
            prefill_context=[self._tensor(c) if c else None for c in rows.context_slots],
            prefill_masks=[self._causal_after(len(c), n) if c else None
                           for c, (_, n) in zip(rows.context_slots, rows.prefill_ranges, strict=True)],
        )

    def _add(self, rows: StepRows, seq: Sequence, count: int) -> None:
        """Appends the rows of `seq`'s next `count` tokens (positions num_cached onwards)."""
        start, first = len(rows.ids), seq.num_cached
        total = first + count
        binding, table, bs = seq.binding, seq.block_table, self.block_size
        if first == 0 or count > 1:
            rows.prefill_ranges.append((start, count))
            # Tokens before the chunk (shared blocks' first, then the sequence's cached ones) are read back from
            # the cache; this step's are written there before attention reads them.
            shared = [b * bs + i for b in binding.shared_blocks for i in range(bs)][:binding.shared_tokens]
            context = [table[p // bs] * bs + p % bs for p in range(total)] if first or shared else []
            rows.context_slots.append(shared + context)
        else:
            rows.decode_rows.append(start)
            rows.tables.append(list(binding.shared_blocks) + table)
            rows.shared_tokens.append(binding.shared_tokens)
            rows.lengths.append(total)
        rows.ids.extend(seq.all_ids[first:total])
        pos = range(first, total)
        rows.positions.extend(p + binding.position_offset for p in pos)
        rows.slots.extend(table[p // bs] * bs + p % bs for p in pos)
        rows.token_slots.extend([binding.slot] * count)
        if total == len(seq):
            rows.logits_rows.append(len(rows.ids) - 1)

    def _causal_after(self, total: int, rows: int) -> torch.Tensor:
        """[rows, total]: the last `rows` of `total` tokens each see every token up to itself."""
        return torch.ones(rows, total, dtype=torch.bool, device=self.device).tril(total - rows)

    def _tensor(self, values: list[int], dtype: torch.dtype = torch.long) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    def _block_tables(self, tables: list[list[int]]) -> torch.Tensor:
        width = max((len(t) for t in tables), default=0)
        return self._tensor([t + [0] * (width - len(t)) for t in tables]).view(len(tables), width)

    def _visibility(self, lengths: list[int], shared_tokens: list[int]) -> DecodeVisibility:
        own = own_starts(shared_tokens, self.block_size)
        return DecodeVisibility(*(self._tensor(v, torch.int32) for v in (shared_tokens, own, lengths)))

    def _segments(self, token_slots: list[int]) -> AdapterSegments:
        bounds, seg_slots = [0], []
        for row, slot in enumerate(token_slots):
            if not seg_slots or slot != seg_slots[-1]:
                if seg_slots:
                    bounds.append(row)
                seg_slots.append(slot)
        bounds.append(len(token_slots))
        return AdapterSegments(bounds=bounds, slots=seg_slots)
