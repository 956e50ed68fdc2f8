"""Decode steps captured once per batch-size bucket and replayed (CUDA graphs).

A small model's decode step is bound by kernel launches (every linear, every adapter site, attention per layer:
hundreds a step); captured as a CUDA graph, one launch replays them all. A step is captured over static buffers,
the batch descriptor's tensors preallocated for the largest bucket; the bucket of B rows (1, 2, 4, 8, then
multiples of 8 up to --max-batch-size) views the first B. Each step the runner's rows are copied into the buffers;
rows past the batch, up to its bucket, are padding: base rows that write and read only the KV cache's scratch
block, whose outputs are dropped.

Adapters change between steps without a new capture: every per-row value the kernels read (tokens, positions, KV
slots, block tables, visibility, adapter slots) is in the buffers, and every per-slot value (ranks, bottleneck
codes) is a device tensor written in place at placement. What the captured grids depend on (the sites holding
weights, each site's rank bound) is the delta set's launch key: when it changes (the first adapter at a new site,
a rank beyond the bound at a site) the buckets are captured again, each at its next use.

`CudaGraphCapture` captures on CUDA. `EagerCapture` stands in for it where there is no GPU (the tests): it runs the
step once under `no_host_sync`, which refuses what a CUDA graph cannot hold (a device value read on the host, a
tensor made from Python data, a data-dependent shape), and replays by running the step again over the buffers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from server.deltas.deltaset import DeltaSet
from server.engine.rows import StepRows, own_starts
from server.kernels.interface import DecodeVisibility
from server.model.attention import PagedKVCache
from server.model.batch import AdapterSegments, BatchDescriptor
from server.model.llama import CausalLM

log = logging.getLogger("deltaserve.graphs")


def bucket_sizes(max_rows: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8, up to max_rows (always included)."""
    sizes = [b for b in (1, 2, 4) if b < max_rows] + list(range(8, max_rows, 8))
    return sizes + [max_rows]


@dataclass
class Captured:
    """One bucket's captured step: `replay()` recomputes `logits` [bucket, vocab] in place from the buffers."""

    replay: Callable[[], None]
    logits: torch.Tensor


class Capture(Protocol):
    def __call__(self, step: Callable[[], torch.Tensor]) -> Captured:
        """Captures `step` (which returns the logits) over whatever the buffers hold now."""


class StaticDecodeBatch:
    """The preallocated tensors of a captured decode step (largest bucket); each bucket's descriptor views the first
    B rows. Never reallocated: a captured step reads them where they were at capture."""

    def __init__(self, max_rows: int, max_blocks: int, block_size: int, scratch_block: int,
                 device: torch.device) -> None:
        self.block_size, self.scratch_block = block_size, scratch_block
        self.longs = torch.zeros(3, max_rows, dtype=torch.long, device=device)   # ids, positions, KV slots
        # [4, max_rows]: shared prefix tokens, own starts, lengths, adapter slot (-1 = base)
        self.ints = torch.zeros(4, max_rows, dtype=torch.int32, device=device)
        self.tables = torch.full((max_rows, max_blocks), scratch_block, dtype=torch.long, device=device)
        self.row_index = torch.arange(max_rows, device=device)   # logits and decode rows: every row, in order
        # what a padding row holds: token 0 at position 0 written to (and read from) the scratch block, base model
        self.pad_longs = [0, 0, scratch_block * block_size]
        self.pad_ints = [0, 0, 1, -1]

    def load(self, rows: StepRows, bucket: int) -> None:
        """Copies the step's decode rows into the buffers and pads them to `bucket` rows."""
        count, pad = len(rows.ids), bucket - len(rows.ids)
        device = self.longs.device
        longs = [rows.ids, rows.positions, rows.slots]
        ints = [rows.shared_tokens, own_starts(rows.shared_tokens, self.block_size), rows.lengths, rows.token_slots]
        self.longs[:, :bucket].copy_(torch.tensor([v + [p] * pad for v, p in zip(longs, self.pad_longs,
                                                                                   strict=True)]).to(device))
        self.ints[:, :bucket].copy_(torch.tensor([v + [p] * pad for v, p in zip(ints, self.pad_ints, strict=True)],
                                                 dtype=torch.int32).to(device))
        # Columns past a row's table keep earlier steps' block ids: valid addresses its visibility never reads.
        width = max(len(t) for t in rows.tables)
        table = torch.tensor([t + [self.scratch_block] * (width - len(t)) for t in rows.tables])
        self.tables[:count, :width].copy_(table.to(device))
        self.tables[count:bucket, 0] = self.scratch_block

    def descriptor(self, bucket: int) -> BatchDescriptor:
        """A fresh descriptor over the first `bucket` rows of the buffers."""
        ids, positions, slots = self.longs[:, :bucket]
        prefix, own, lengths, row_slots = self.ints[:, :bucket]
        index = self.row_index[:bucket]
        return BatchDescriptor(
            input_ids=ids, positions=positions, slot_mapping=slots, logits_indices=index, prefill_ranges=[],
            decode_rows=index, decode_block_tables=self.tables[:bucket],
            decode_visibility=DecodeVisibility(prefix, own, lengths), block_size=self.block_size,
            segments=AdapterSegments(bounds=[0, bucket], slots=[-1]),
            decode_is_all=True, row_slots=row_slots)


class DecodeGraphs:
    """Decode steps of up to `max_rows` rows, captured per bucket and replayed; owned by the engine thread."""

    def __init__(self, model: CausalLM, kv_cache: PagedKVCache, deltas: DeltaSet | None, max_rows: int,
                 capture: Capture) -> None:
        self.model, self.kv_cache, self.deltas = model, kv_cache, deltas
        self.buckets = bucket_sizes(max_rows)
        self.static = StaticDecodeBatch(max_rows, kv_cache.max_blocks, kv_cache.block_size, kv_cache.scratch_block,
                                        kv_cache.storage.device)
        self.capture = capture
        self.graphs: dict[int, Captured] = {}
        self.key: tuple | None = None
        self.captures = 0   # captures so far (each bucket once per launch key)
        self.replays = 0

    def fits(self, rows: StepRows) -> bool:
        """Whether a decode step can be replayed: few enough rows, and every adapter in it applies through device
        tensors alone."""
        if len(rows.ids) > self.buckets[-1]:
            return False
        return self.deltas is None or self.deltas.capturable(set(rows.token_slots))

    def run(self, rows: StepRows) -> torch.Tensor:
        """The decode step's logits [rows, vocab] (a view of the bucket's output: valid until the next step)."""
        count = len(rows.ids)
        bucket = next(b for b in self.buckets if b >= count)
        key = self.deltas.launch_key() if self.deltas is not None else ()
        if key != self.key:
            if self.graphs:
                log.info("adapter sites or rank bounds changed: decode steps will be captured again")
            self.graphs.clear()
            self.key = key
        self.static.load(rows, bucket)
        captured = self.graphs.get(bucket)
        if captured is None:
            batch = self.static.descriptor(bucket)
            captured = self.graphs[bucket] = self.capture(lambda: self._step(batch))
            self.captures += 1
            log.info("captured the decode step of %d rows", bucket)
        captured.replay()
        self.replays += 1
        return captured.logits[:count]

    def _step(self, batch: BatchDescriptor) -> torch.Tensor:
        if self.deltas is not None:
            self.deltas.prepare(batch)
        return self.model(batch, self.kv_cache)


class CudaGraphCapture:
    """Captures into CUDA graphs sharing one memory pool (buckets replay one at a time)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool: tuple | None = None

    def __call__(self, step: Callable[[], torch.Tensor]) -> Captured:
        # Run twice outside the capture first, on a side stream: Triton autotunes and compiles, lazy state settles.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the service threads may touch CUDA while the engine thread captures
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            logits = step()
        self.pool = graph.pool()
        return Captured(graph.replay, logits)


class EagerCapture:
    """The capture of a device without graphs (tests on CPU): the step runs under `no_host_sync` once, and replays
    run it again over the same buffers, into the same output tensor."""

    def __call__(self, step: Callable[[], torch.Tensor]) -> Captured:
        with no_host_sync():
            logits = step()

        def replay() -> None:
            with torch.inference_mode():   # the model's output is an inference tensor
                logits.copy_(step())

        return Captured(replay, logits)


class HostSyncError(RuntimeError):
    """A captured step did something a CUDA graph cannot replay."""


# Operators a CUDA graph cannot capture: their result goes to the host, or its shape depends on the data.
_DATA_TO_HOST = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
                 "aten._unique2.default", "aten.unique_dim.default", "aten.unique_consecutive.default",
                 "aten.repeat_interleave.Tensor", "aten.lift_fresh.default", "aten.lift_fresh_copy.default"}
_HOST_METHODS = {"tolist", "numpy", "item", "__bool__", "__int__", "__float__", "__index__"}


class _NoHostDispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if str(func) in _DATA_TO_HOST:
            raise HostSyncError(f"{func} in a captured step: it reads device data on the host, makes a tensor "
                                "from Python data or has a data-dependent shape")
        return func(*args, **(kwargs or {}))


class _NoHostFunctions(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if getattr(func, "__name__", "") in _HOST_METHODS:
            raise HostSyncError(f"Tensor.{func.__name__} in a captured step: it reads device data on the host")
        return func(*args, **(kwargs or {}))


class no_host_sync:  # noqa: N801  (a context manager, used like a function)
    """Within it, torch refuses what a CUDA graph capture refuses or would silently freeze (HostSyncError)."""

    def __enter__(self) -> None:
        self._modes = (_NoHostFunctions(), _NoHostDispatch())
        for mode in self._modes:
            mode.__enter__()

    def __exit__(self, *exc: object) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
