"""Captured decode steps (issue 16's CUDA graphs), checked without a GPU: the Triton kernels run under their
interpreter and `EagerCapture` stands in for the CUDA graph. It runs the captured step under `no_host_sync`, which
refuses what a capture refuses, and replays it over the same static buffers. What it cannot see (Python values
frozen into a real graph) is what the delta set's launch key names; benchmarks/gpu_check.py compares captured and
eager tokens on a GPU."""

from __future__ import annotations

import dataclasses
import os

os.environ["TRITON_INTERPRET"] = "1"   # before any Triton kernel is decorated (see test_kernels_backends.py)

import pytest  # noqa: E402
import torch  # noqa: E402

from adapters_store.types import BottleneckModule, BottleneckParts, LoraModule, LoraParts  # noqa: E402
from server.deltas.base import DeltaLimits  # noqa: E402
from server.deltas.deltaset import DeltaSet  # noqa: E402
from server.engine.graphs import DecodeGraphs, EagerCapture, HostSyncError, bucket_sizes, no_host_sync  # noqa: E402
from server.engine.rows import StepRows  # noqa: E402
from server.engine.runner import ModelRunner  # noqa: E402
from server.kernels import registry, triton_backend  # noqa: E402,F401  (triton: decorated while interpreting)
from server.model.attention import PagedKVCache  # noqa: E402
from server.model.loader import load_model  # noqa: E402
from tests.tolerance import model_logit_tolerance  # noqa: E402

BLOCK = 4
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def test_buckets():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(8) == [1, 2, 4, 8]
    assert bucket_sizes(30) == [1, 2, 4, 8, 16, 24, 30]


def test_no_host_sync_refuses_what_a_capture_cannot_hold():
    x = torch.arange(6.0)
    for bad in (lambda: x.sum().item(), lambda: x.tolist(), lambda: bool(x[1] > 0), lambda: torch.tensor([1, 2]),
                lambda: x.nonzero(), lambda: int(x[2])):
        with pytest.raises(HostSyncError), no_host_sync():
            bad()
    with no_host_sync():   # device work with static shapes is fine
        y = (x * 2).clamp(min=1).index_select(0, torch.arange(3)) + torch.zeros(3)
    assert y.tolist() == [1.0, 2.0, 4.0]


class Stack:
    """The tiny fixture model with the Triton kernels, a KV cache of random keys/values and adapters in 4 slots."""

    def __init__(self, loaded) -> None:  # noqa: ANN001
        shape = loaded.model.shape
        self.model = loaded.model
        self.kv = PagedKVCache(shape.num_layers, 24, BLOCK, shape.num_kv_heads, shape.head_dim, torch.float32,
                               torch.device("cpu"), max_batch=8, max_len=64)
        self.gen = torch.Generator().manual_seed(16)
        self.kv.storage.normal_(generator=self.gen)
        self.deltas = DeltaSet(self.model, DeltaLimits(num_slots=4, max_lora_rank=64, max_bottleneck_rank=16))
        self.graphs = DecodeGraphs(self.model, self.kv, self.deltas, 8, EagerCapture())
        self.runner = ModelRunner(self.model, self.kv, torch.device("cpu"), self.deltas, self.graphs)

    def lora(self, slot: int, rank: int, sites: tuple[str, ...] = ("q_proj", "v_proj", "down_proj")) -> None:
        linears = self.model.adaptable_linears()
        modules = {path: LoraModule(a=torch.randn(rank, m.in_features, generator=self.gen),
                                    b=torch.randn(m.out_features, rank, generator=self.gen), scale=0.5)
                   for path, m in linears.items() if path.endswith(sites)}
        self.deltas.clear(slot, {"lora": None})
        self.deltas.place(slot, {"lora": LoraParts(modules)})

    def bottleneck(self, slot: int, count: int = 1) -> None:
        hidden = self.model.shape.hidden_size
        modules = [BottleneckModule(layer=0, site="ffn", input="sublayer_input", activation="gelu", scale=0.7,
                                    down=torch.randn(8, hidden, generator=self.gen),
                                    down_bias=torch.randn(8, generator=self.gen),
                                    up=torch.randn(hidden, 8, generator=self.gen),
                                    up_bias=torch.randn(hidden, generator=self.gen)) for _ in range(count)]
        self.deltas.place(slot, {"bottleneck": BottleneckParts(modules)})

    def rows(self, slots: list[int], lengths: list[int], shared: list[int] | None = None) -> StepRows:
        """Decode rows (sorted by slot, as the runner lays them out), each over its own blocks after `shared`
        tokens of shared blocks (blocks 20-21)."""
        rows, next_block = StepRows(), 0
        for slot, length, front in zip(slots, lengths, shared or [0] * len(slots), strict=True):
            own = list(range(next_block, next_block + -(-length // BLOCK)))
            next_block += len(own)
            position = length - 1
            rows.decode_rows.append(len(rows.ids))
            rows.logits_rows.append(len(rows.ids))
            rows.ids.append(int(torch.randint(256, (), generator=self.gen)))
            rows.positions.append(position)
            rows.slots.append(own[position // BLOCK] * BLOCK + position % BLOCK)
            rows.token_slots.append(slot)
            rows.tables.append([20, 21][:-(-front // BLOCK)] + own)
            rows.shared_tokens.append(front)
            rows.lengths.append(length)
        return rows

    def eager(self, rows: StepRows) -> torch.Tensor:
        batch = self.runner.describe(rows)
        self.deltas.prepare(batch)
        return self.model(batch, self.kv)


def _assert_close(stack: Stack, rows: StepRows, got: torch.Tensor) -> None:
    """got equals the eager step's logits within the fp32 tolerance, and every adapter row's adapter moves its
    logits by more than 20 tolerances (so the comparison can tell a missing or misplaced delta)."""
    want = stack.eager(rows)
    tolerance = model_logit_tolerance(stack.model.shape, want, positions=64)
    assert (got - want).abs().max().item() <= tolerance
    base = stack.eager(dataclasses.replace(rows, token_slots=[-1] * len(rows.ids)))
    moved = (base - want).abs().amax(dim=1)   # [rows]
    assert all(moved[row] > 20 * tolerance for row, slot in enumerate(rows.token_slots) if slot >= 0)


@pytest.fixture
def stack(tiny_model_dir, cache_dir):
    registry.configure("triton")
    try:
        yield Stack(load_model(str(tiny_model_dir), cache_dir, "cpu", "float32"))
    finally:
        registry.configure(None)


def test_a_captured_step_equals_the_eager_one_and_touches_only_its_rows(stack):
    """Replayed over rows it was not captured with (other adapters, lengths, a shared prefix), a bucket's step gives
    the eager step's logits up to fp32 summation order (the base model's products over 4 rows rather than 3 may
    sum in another order: tests/tolerance.py). Its padding rows write only the scratch block."""
    stack.lora(0, 8)
    stack.lora(1, 3, ("k_proj", "o_proj", "up_proj"))
    stack.bottleneck(2)
    first = stack.rows([-1, 0, 2], [5, 9, 3])
    stack.graphs.run(first)   # captures bucket 4
    for slots, lengths, shared in (([0, 1, 2], [7, 2, 13], [0, 6, 0]), ([-1, -1, 1], [1, 4, 8], None)):
        rows = stack.rows(slots, lengths, shared)
        before = stack.kv.storage.clone()
        got = stack.graphs.run(rows).clone()
        changed = (stack.kv.storage != before).any(dim=(0, 1, 3, 4)).nonzero().flatten().tolist()
        scratch = range(stack.kv.scratch_block * BLOCK, (stack.kv.scratch_block + 1) * BLOCK)
        assert set(changed) <= set(rows.slots) | set(scratch)
        assert set(rows.slots) <= set(changed)
        _assert_close(stack, rows, got)
    assert stack.graphs.captures == 1


def test_adapter_changes_need_no_new_capture_until_a_rank_outgrows_its_bound(stack):
    stack.lora(0, 8)
    stack.bottleneck(1)
    rows = stack.rows([0, 1], [6, 3])
    stack.graphs.run(rows)
    stack.lora(0, 16)                 # new weights, the same sites, a rank within the bound (16)
    stack.lora(3, 2)                  # a new slot
    stack.deltas.clear(1, {"bottleneck": None})
    stack.bottleneck(2)
    for slots in ([0, 2, 3], [-1, 3], [0, 2]):
        rows = stack.rows(slots, [4] * len(slots))
        _assert_close(stack, rows, stack.graphs.run(rows).clone())
    assert stack.graphs.captures == 2   # buckets 2 and 4, once each
    stack.lora(0, 17)                   # beyond the bound at its sites (now 32): the grids change
    rows = stack.rows([0, 3], [5, 5])
    _assert_close(stack, rows, stack.graphs.run(rows).clone())
    assert stack.graphs.captures == 3


def test_a_slot_the_kernels_cannot_carry_stays_eager(stack):
    stack.bottleneck(0, count=2)   # two modules at one place: the reference loop, in order
    stack.lora(1, 4)
    assert not stack.graphs.fits(stack.rows([0, 1], [3, 3]))
    assert stack.graphs.fits(stack.rows([-1, 1], [3, 3]))


def test_the_engine_gives_the_same_tokens_with_captured_decode_steps(tmp_path):
    """Every method and the base model mixed, 7 adapters through 4 device slots (so adapters move between steps):
    the same greedy tokens with every decode step replayed as without."""
    from server.engine.request import GenerationRequest
    from tests.fixtures.mixed import mixed_server
    from tests.test_chunked_prefill import TEXT, _run_all

    adapters = ("peft-lora", "peft-prefix", "prefix_tuning", "par_bn", "seq_bn", "mam", "double_seq_bn")
    # one request each, of growing lengths: as they finish, the decode batches shrink through every bucket
    requests = [GenerationRequest(f"{name or 'base'}", prompt=TEXT[i:i + 9 + i], adapter_id=name,
                                  max_new_tokens=4 + i, ignore_eos=True)
                for i, name in enumerate(("", *adapters))]
    try:
        with mixed_server(tmp_path, ("prefix_tuning", "par_bn", "seq_bn", "mam", "double_seq_bn"), kernels="triton",
                          max_model_len=128, max_batch_size=8, max_device_adapters=4) as server:
            engine, stack = server.engine, server.running.stack
            eager = [list(r.token_ids) for r in _run_all(engine, requests)]
            graphs = DecodeGraphs(stack.loaded.model, engine.runner.kv_cache, stack.deltas, 8, EagerCapture())
            engine.call(lambda: setattr(engine.runner, "graphs", graphs))
            replayed = [list(r.token_ids) for r in _run_all(engine, requests)]
    finally:
        registry.configure(None)
    assert replayed == eager
    assert graphs.replays >= 10 and len(graphs.graphs) >= 3   # decode steps of several bucket sizes replayed
