"""Random cases for the Triton kernels against the torch reference, shared by the interpreter tests
(tests/test_kernels_triton.py) and the GPU check (benchmarks/gpu_check.py). Each returns the worst ratio of an
element's error to its derived bound (tests/kernel_tolerance.py; ≤ 1 passes; inf when a row no segment acts on was
touched) and the largest absolute error. Layouts: random segments (some empty), base rows (no segment) first and
between, ranks 1-128 mixed in one call beside a slot of rank 0, stack rows beyond each rank NaN."""

from __future__ import annotations

import torch

from adapters_store.types import ACTIVATIONS, BOTTLENECK_INPUTS, activate
from server.kernels.interface import DecodeVisibility
from server.kernels.torch_ref import decode_attention_reference, lora_segments_reference
from server.kernels.triton_attention import paged_decode_attention
from server.kernels.triton_bottleneck import ACTIVATION_CODES, bottleneck_fused
from server.kernels.triton_common import SegmentTable
from server.kernels.triton_lora import lora_expand, lora_shrink
from tests.kernel_tolerance import attention_bound, bottleneck_bound, lora_bound

Segments = list[tuple[int, int, int]]
LORA_RANKS = [1, 128, 0, 17, 64, 5, 33, 8]   # 0: the slot's adapter does not act here
BOTTLENECK_RANKS = [3, 64, 0, 16, 1, 128, 9]


def random_layout(gen: torch.Generator, rows: int, slots: int, max_len: int) -> Segments:
    segments, row = [], 2
    while row < rows:
        length = min(int(torch.randint(0, max_len + 1, (1,), generator=gen)), rows - row)
        if int(torch.randint(0, 4, (1,), generator=gen)) == 0:
            row += max(length, 1)            # base rows: no segment covers them
            continue
        segments.append((row, row + length, int(torch.randint(0, slots, (1,), generator=gen))))
        row += length
    return segments


def untouched(segments: Segments, ranks: list[int], rows: int) -> torch.Tensor:
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


def _worst(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor) -> tuple[float, float]:
    err = (got.float() - want.float()).abs()
    return float((err / bound.clamp_min(1e-30)).max()), float(err.max())


def _merge(results: list[tuple[float, float]]) -> tuple[float, float]:
    return max((r for r, _ in results), default=0.0), max((e for _, e in results), default=0.0)


def lora_case(dtype: torch.dtype, device: str, max_len: int, seed: int = 0, rows: int = 48, fan_in: int = 80,
              fan_out: int = 72) -> tuple[float, float]:
    gen = torch.Generator().manual_seed(seed)
    a = filled_stack(gen, LORA_RANKS, 128, fan_in, dtype)
    bt = filled_stack(gen, LORA_RANKS, 128, fan_out, dtype, scale=0.1)
    segments = random_layout(gen, rows, len(LORA_RANKS), max_len)
    x = torch.randn(rows, fan_in, generator=gen).to(dtype)
    y = torch.randn(rows, fan_out, generator=gen).to(dtype)
    want = y.clone()
    lora_segments_reference(x, want, a, bt, LORA_RANKS, segments)
    ranks = torch.tensor(LORA_RANKS, dtype=torch.int32, device=device)
    table = SegmentTable.build(segments, device)
    h = torch.empty(rows, max(LORA_RANKS), dtype=torch.float32, device=device)
    got = y.to(device)
    lora_shrink(x.to(device), a.to(device), ranks, table, h, max(LORA_RANKS))
    lora_expand(h, bt.to(device), ranks, table, got, max(LORA_RANKS))
    got = got.cpu()
    free = untouched(segments, LORA_RANKS, rows)
    if not torch.equal(got[free], y[free]):
        return float("inf"), float("inf")
    return _merge([_worst(got[s:e], want[s:e], lora_bound(x[s:e], a[slot, :r], bt[slot, :r], want[s:e], dtype))
                   for s, e, slot in segments if (r := LORA_RANKS[slot]) and e > s])


def bottleneck_case(dtype: torch.dtype, device: str, seed: int = 3, rows: int = 40,
                    hidden: int = 48) -> tuple[float, float]:
    gen = torch.Generator().manual_seed(seed)
    ranks = BOTTLENECK_RANKS
    down = filled_stack(gen, ranks, 128, hidden, dtype, scale=0.3)
    up_t = filled_stack(gen, ranks, 128, hidden, dtype, scale=0.2)
    down_bias = filled_stack(gen, ranks, 128, 1, dtype)[..., 0]
    up_bias = torch.randn(len(ranks), hidden, generator=gen).to(dtype)
    inputs = [BOTTLENECK_INPUTS[s % 3] for s in range(len(ranks))]
    activations = [ACTIVATIONS[(2 * s + 1) % len(ACTIVATIONS)] for s in range(len(ranks))]
    tensors = {name: torch.randn(rows, hidden, generator=gen).to(dtype) for name in BOTTLENECK_INPUTS}
    segments = random_layout(gen, rows, len(ranks), 12)
    block_out = tensors["block_output"]
    want, acts = block_out.clone(), {}
    for start, end, slot in segments:
        if (r := ranks[slot]) and end > start:
            x = tensors[inputs[slot]][start:end].float()
            acts[start] = activate(activations[slot], x @ down[slot, :r].float().t() + down_bias[slot, :r].float())
            want[start:end] = (want[start:end].float() + acts[start] @ up_t[slot, :r].float()
                               + up_bias[slot].float()).to(dtype)
    on = {name: t.to(device) for name, t in tensors.items()}
    got = on["block_output"] = block_out.to(device).clone()
    codes = [torch.tensor([names.index(v) for v in values], dtype=torch.int32, device=device)
             for names, values in ((BOTTLENECK_INPUTS, inputs), (ACTIVATION_CODES, activations))]
    bottleneck_fused(on["sublayer_input"], on["sublayer_output"], got, down.to(device), down_bias.to(device),
                     up_t.to(device), up_bias.to(device), torch.tensor(ranks, dtype=torch.int32, device=device),
                     codes[0], codes[1], SegmentTable.build(segments, device), max(ranks))
    got = got.cpu()
    free = untouched(segments, ranks, rows)
    if not torch.equal(got[free], block_out[free]):
        return float("inf"), float("inf")
    results = []
    for s, e, slot in segments:
        if (r := ranks[slot]) and e > s:
            bound = bottleneck_bound(tensors[inputs[slot]][s:e], down[slot, :r], down_bias[slot, :r], up_t[slot, :r],
                                     up_bias[slot], acts[s], want[s:e], dtype)
            results.append(_worst(got[s:e], want[s:e], bound))
    return _merge(results)


def attention_case(dtype: torch.dtype, device: str, seed: int = 5, block_size: int = 8, kv_heads: int = 2,
                   group: int = 3, head_dim: int = 32) -> tuple[float, float]:
    gen = torch.Generator().manual_seed(seed)
    num_blocks = 40
    k_cache = torch.randn(num_blocks * block_size, kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks * block_size, kv_heads, head_dim, generator=gen).to(dtype)
    # (shared prefix tokens, own tokens): no prefix, a prefix ending mid-block, one token, long rows
    rows = [(0, 13), (11, 5), (0, 1), (3, 40), (20, 24)]
    max_blocks = max(-(-p // block_size) + -(-n // block_size) for p, n in rows)
    tables = torch.zeros(len(rows), max_blocks, dtype=torch.int32)
    own_starts = []
    for b, (prefix, own) in enumerate(rows):
        used = -(-prefix // block_size) + -(-own // block_size)
        tables[b, :used] = torch.randperm(num_blocks, generator=gen)[:used].to(torch.int32)
        own_starts.append(-(-prefix // block_size) * block_size)
    vis = DecodeVisibility(*(torch.tensor(v, dtype=torch.int32) for v in
                             ([p for p, _ in rows], own_starts, [n for _, n in rows])))
    q = torch.randn(len(rows), kv_heads * group, head_dim, generator=gen).to(dtype)
    scale = head_dim ** -0.5
    want = decode_attention_reference(q, k_cache, v_cache, tables, vis, block_size, scale)
    got = paged_decode_attention(q.to(device), k_cache.to(device), v_cache.to(device), tables.to(device),
                                 vis.prefix_lens.to(device), vis.own_starts.to(device), vis.lengths.to(device),
                                 block_size, scale).cpu()
    mask = vis.mask(max_blocks * block_size)
    results = []
    for b in range(len(rows)):
        positions = (tables[b].long().unsqueeze(1) * block_size + torch.arange(block_size)).reshape(-1)[mask[b]]
        for h in range(kv_heads * group):
            keys, values = k_cache[positions, h // group], v_cache[positions, h // group]
            bound = attention_bound(q[b, h], keys, values, scale, want[b, h], dtype)
            results.append(_worst(got[b, h], want[b, h], bound))
    return _merge(results)
