"""Every Triton kernel, run by Triton's interpreter on CPU, against the torch reference: random segment layouts,
ranks 1-128 mixed in one call, empty segments, base rows (no segment), unwritten stack rows (NaN), fp32 and bf16,
within the bounds of tests/kernel_tolerance.py."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"   # before any Triton kernel is decorated

import pytest  # noqa: E402
import torch  # noqa: E402

from adapters_store.types import ACTIVATIONS, BOTTLENECK_INPUTS, activate  # noqa: E402
from server.kernels import triton_common  # noqa: E402
from server.kernels.interface import DecodeVisibility  # noqa: E402
from server.kernels.torch_ref import decode_attention_reference, lora_segments_reference  # noqa: E402
from server.kernels.triton_attention import paged_decode_attention  # noqa: E402
from server.kernels.triton_bottleneck import ACTIVATION_CODES, bottleneck_fused  # noqa: E402
from server.kernels.triton_common import SegmentTable  # noqa: E402
from server.kernels.triton_lora import lora_expand, lora_shrink  # noqa: E402
from tests.kernel_tolerance import attention_bound, bottleneck_bound, lora_bound  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16)
# sigmoid(x) = 1 / (1 + exp(-x)) overflows to the right limit for very negative x (numpy warns, Triton does not)
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def test_kernels_are_interpreted():
    assert triton_common.INTERPRET, "server.kernels.triton_* was imported before TRITON_INTERPRET=1 was set"


def random_layout(gen: torch.Generator, rows: int, slots: int, max_len: int) -> list[tuple[int, int, int]]:
    """Segments over `rows` rows: random lengths (some empty), random slots, base rows (no segment) first and
    between."""
    segments, row = [], 2
    while row < rows:
        length = int(torch.randint(0, max_len + 1, (1,), generator=gen))
        length = min(length, rows - row)
        if int(torch.randint(0, 4, (1,), generator=gen)) == 0:
            row += max(length, 1)            # base rows: no segment covers them
            continue
        segments.append((row, row + length, int(torch.randint(0, slots, (1,), generator=gen))))
        row += length
    return segments


def untouched(segments: list[tuple[int, int, int]], ranks: list[int], rows: int) -> torch.Tensor:
    """[rows] bool: rows no acting segment covers (base rows, empty segments, slots of rank 0 here)."""
    free = torch.ones(rows, dtype=torch.bool)
    for start, end, slot in segments:
        if ranks[slot]:
            free[start:end] = False
    return free


def filled_stack(gen: torch.Generator, ranks: list[int], rows: int, width: int, dtype: torch.dtype,
                 scale: float = 1.0) -> torch.Tensor:
    """[slots, rows, width]: each slot's first `rank` rows random, the rest NaN (never to be read)."""
    stack = torch.full((len(ranks), rows, width), float("nan"), dtype=dtype)
    for slot, rank in enumerate(ranks):
        stack[slot, :rank] = (torch.randn(rank, width, generator=gen) * scale).to(dtype)
    return stack


RANKS = [1, 128, 0, 17, 64, 5, 33, 8]   # 0: the slot's adapter does not act here


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("max_len", [1, 24])   # decode-like (one row each) and prefill-like segments
def test_lora_shrink_expand(dtype, max_len):
    gen = torch.Generator().manual_seed(max_len)
    rows, fan_in, fan_out = 48, 80, 72
    a = filled_stack(gen, RANKS, 128, fan_in, dtype)
    bt = filled_stack(gen, RANKS, 128, fan_out, dtype, scale=0.1)
    segments = random_layout(gen, rows, len(RANKS), max_len)
    x = torch.randn(rows, fan_in, generator=gen).to(dtype)
    y = torch.randn(rows, fan_out, generator=gen).to(dtype)
    want = y.clone()
    lora_segments_reference(x, want, a, bt, RANKS, segments)
    table = SegmentTable.build(segments, "cpu")
    ranks = torch.tensor(RANKS, dtype=torch.int32)
    h = torch.empty(rows, max(RANKS), dtype=torch.float32)
    got = y.clone()
    lora_shrink(x, a, ranks, table, h, max(RANKS))
    lora_expand(h, bt, ranks, table, got, max(RANKS))
    for start, end, slot in segments:
        r = RANKS[slot]
        if r and end > start:
            bound = lora_bound(x[start:end], a[slot, :r], bt[slot, :r], want[start:end], dtype)
            assert ((got[start:end].float() - want[start:end].float()).abs() <= bound).all(), (start, end, r)
    free = untouched(segments, RANKS, rows)
    assert free.any() and torch.equal(got[free], y[free])


@pytest.mark.parametrize("dtype", DTYPES)
def test_bottleneck_fused(dtype):
    gen = torch.Generator().manual_seed(3)
    rows, hidden, ranks = 40, 48, [3, 64, 0, 16, 1, 128, 9]
    down = filled_stack(gen, ranks, 128, hidden, dtype, scale=0.3)
    up_t = filled_stack(gen, ranks, 128, hidden, dtype, scale=0.2)
    down_bias = filled_stack(gen, ranks, 128, 1, dtype)[..., 0]
    up_bias = torch.randn(len(ranks), hidden, generator=gen).to(dtype)
    inputs = [BOTTLENECK_INPUTS[s % 3] for s in range(len(ranks))]
    activations = [ACTIVATIONS[(2 * s + 1) % len(ACTIVATIONS)] for s in range(len(ranks))]
    tensors = {name: torch.randn(rows, hidden, generator=gen).to(dtype) for name in BOTTLENECK_INPUTS}
    segments = random_layout(gen, rows, len(ranks), 12)
    block_out = tensors["block_output"]
    want = block_out.clone()
    acts = {}
    for start, end, slot in segments:
        r = ranks[slot]
        if r and end > start:
            x = tensors[inputs[slot]][start:end].float()
            acts[start] = activate(activations[slot], x @ down[slot, :r].float().t() + down_bias[slot, :r].float())
            want[start:end] = (want[start:end].float() + acts[start] @ up_t[slot, :r].float()
                               + up_bias[slot].float()).to(dtype)
    got = tensors["block_output"] = block_out.clone()
    codes = [torch.tensor([names.index(v) for v in values], dtype=torch.int32)
             for names, values in ((BOTTLENECK_INPUTS, inputs), (ACTIVATION_CODES, activations))]
    bottleneck_fused(tensors["sublayer_input"], tensors["sublayer_output"], got, down, down_bias, up_t, up_bias,
                     torch.tensor(ranks, dtype=torch.int32), codes[0], codes[1], SegmentTable.build(segments, "cpu"),
                     max(ranks))
    for start, end, slot in segments:
        r = ranks[slot]
        if r and end > start:
            x = (tensors[inputs[slot]] if inputs[slot] != "block_output" else block_out)[start:end]
            bound = bottleneck_bound(x, down[slot, :r], down_bias[slot, :r], up_t[slot, :r], up_bias[slot],
                                     acts[start], want[start:end], dtype)
            err = (got[start:end].float() - want[start:end].float()).abs()
            assert (err <= bound).all(), (activations[slot], inputs[slot], r, float(err.max()))
    free = untouched(segments, ranks, rows)
    assert free.any() and torch.equal(got[free], block_out[free])


@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_decode_attention(dtype):
    gen = torch.Generator().manual_seed(5)
    block_size, kv_heads, group, head_dim, num_blocks = 8, 2, 3, 32, 40
    k_cache = torch.randn(num_blocks * block_size, kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks * block_size, kv_heads, head_dim, generator=gen).to(dtype)
    # (shared prefix tokens, own tokens): no prefix, a prefix ending mid-block, one token, a long row
    rows = [(0, 13), (11, 5), (0, 1), (3, 40), (20, 24)]
    max_blocks = max(-(-p // block_size) + -(-n // block_size) for p, n in rows)
    tables = torch.zeros(len(rows), max_blocks, dtype=torch.int32)
    own_starts = []
    for b, (prefix, own) in enumerate(rows):
        used = -(-prefix // block_size) + -(-own // block_size)
        tables[b, :used] = torch.randperm(num_blocks, generator=gen)[:used].to(torch.int32)
        own_starts.append(-(-prefix // block_size) * block_size)
    vis = DecodeVisibility(torch.tensor([p for p, _ in rows], dtype=torch.int32),
                           torch.tensor(own_starts, dtype=torch.int32), torch.tensor([n for _, n in rows],
                                                                                    dtype=torch.int32))
    q = torch.randn(len(rows), kv_heads * group, head_dim, generator=gen).to(dtype)
    scale = head_dim ** -0.5
    want = decode_attention_reference(q, k_cache, v_cache, tables, vis, block_size, scale)
    got = paged_decode_attention(q, k_cache, v_cache, tables, vis.prefix_lens, vis.own_starts, vis.lengths,
                                 block_size, scale)
    mask = vis.mask(max_blocks * block_size)
    for b in range(len(rows)):
        positions = (tables[b].long().unsqueeze(1) * block_size + torch.arange(block_size)).reshape(-1)[mask[b]]
        for h in range(kv_heads * group):
            keys, values = k_cache[positions, h // group], v_cache[positions, h // group]
            bound = attention_bound(q[b, h], keys, values, scale, want[b, h], dtype)
            assert ((got[b, h].float() - want[b, h].float()).abs() <= bound).all(), (b, h)
