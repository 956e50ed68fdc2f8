"""Rank-exact grouped LoRA in Triton (S-LoRA / Punica style): shrink h = x · Aᵀ and expand y += h · Bt.

Every program reads its segment's slot and that slot's rank from the stacks' rank vector: rank blocks beyond it
exit at once and the weight rows beyond it are never loaded, so no adapter is padded to the largest rank (one
launch mixes ranks 1 to 128 at the cost of each). Segments are contiguous rows of one slot (a prefill segment,
or a decode segment of one row or a few). Autotuning keys: rows per segment (bucketed), width and rank bound.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from server.kernels.triton_common import INTERPRET, Launcher, SegmentTable, dot_precision, next_pow2


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, h_ptr, ranks_ptr, starts_ptr, lens_ptr, slots_ptr,
                   in_features, stride_xm, stride_as, stride_ar, stride_hm, len_bucket, rank_bound,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                   DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    seg = tl.program_id(0)
    r0 = tl.program_id(1) * BLOCK_R
    m0 = tl.program_id(2) * BLOCK_M
    slot = tl.load(slots_ptr + seg)
    rank = tl.load(ranks_ptr + slot)
    length = tl.load(lens_ptr + seg)
    if (r0 < rank) & (m0 < length):
        start = tl.load(starts_ptr + seg)
        rows = m0 + tl.arange(0, BLOCK_M)
        rs = r0 + tl.arange(0, BLOCK_R)
        ks = tl.arange(0, BLOCK_K)
        row_ok = rows < length
        r_ok = rs < rank
        x_rows = x_ptr + (start + rows).to(tl.int64)[:, None] * stride_xm
        a_rows = a_ptr + slot.to(tl.int64) * stride_as + rs[None, :] * stride_ar
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, in_features, BLOCK_K):
            k = k0 + ks
            k_ok = k < in_features
            xt = tl.load(x_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
            at = tl.load(a_rows + k[:, None], mask=r_ok[None, :] & k_ok[:, None], other=0.0)    # [BK, BR]
            if DOT_F32:
                xt = xt.to(tl.float32)
                at = at.to(tl.float32)
            acc += tl.dot(xt, at, input_precision=PRECISION)
        h_out = h_ptr + (start + rows).to(tl.int64)[:, None] * stride_hm + rs[None, :]
        tl.store(h_out, acc, mask=row_ok[:, None] & r_ok[None, :])


@triton.jit
def _expand_kernel(h_ptr, bt_ptr, y_ptr, ranks_ptr, starts_ptr, lens_ptr, slots_ptr,
                   out_features, stride_hm, stride_bs, stride_br, stride_ym, len_bucket, rank_bound,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                   DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    seg = tl.program_id(0)
    m0 = tl.program_id(1) * BLOCK_M
    n0 = tl.program_id(2) * BLOCK_N
    slot = tl.load(slots_ptr + seg)
    rank = tl.load(ranks_ptr + slot)
    length = tl.load(lens_ptr + seg)
    if (rank > 0) & (m0 < length):
        start = tl.load(starts_ptr + seg)
        rows = m0 + tl.arange(0, BLOCK_M)
        ns = n0 + tl.arange(0, BLOCK_N)
        rr = tl.arange(0, BLOCK_R)
        row_ok = rows < length
        n_ok = ns < out_features
        h_rows = h_ptr + (start + rows).to(tl.int64)[:, None] * stride_hm
        b_cols = bt_ptr + slot.to(tl.int64) * stride_bs + ns[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            rs = r0 + rr
            r_ok = rs < rank
            ht = tl.load(h_rows + rs[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)   # [BM, BR] fp32
            bt = tl.load(b_cols + rs[:, None] * stride_br, mask=r_ok[:, None] & n_ok[None, :], other=0.0)  # [BR, BN]
            if DOT_F32:
                bt = bt.to(tl.float32)
            else:
                ht = ht.to(bt.dtype)
            acc += tl.dot(ht, bt, input_precision=PRECISION)
        y_tile = y_ptr + (start + rows).to(tl.int64)[:, None] * stride_ym + ns[None, :]
        tile_ok = row_ok[:, None] & n_ok[None, :]
        y = tl.load(y_tile, mask=tile_ok, other=0.0).to(tl.float32)
        tl.store(y_tile, (y + acc).to(y_ptr.dtype.element_ty), mask=tile_ok)


def _configs(names: tuple[str, str, str], sizes: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    return [triton.Config(dict(zip(names, s[:3], strict=True)), num_warps=s[3]) for s in sizes]


_SHRINK = Launcher(
    _shrink_kernel,
    _configs(("BLOCK_M", "BLOCK_R", "BLOCK_K"), [(16, 16, 128, 4), (16, 32, 64, 4), (32, 16, 128, 4),
                                                 (64, 32, 64, 4), (16, 64, 64, 4), (64, 64, 32, 8)]),
    key=["in_features", "len_bucket", "rank_bound"], default={"BLOCK_M": 16, "BLOCK_R": 16, "BLOCK_K": 32})
_EXPAND = Launcher(
    _expand_kernel,
    _configs(("BLOCK_M", "BLOCK_N", "BLOCK_R"), [(16, 64, 16, 4), (16, 128, 16, 4), (16, 256, 16, 8),
                                                 (32, 128, 32, 4), (64, 128, 16, 4), (64, 64, 32, 4)]),
    key=["out_features", "len_bucket", "rank_bound"], default={"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_R": 16},
    restore=("y_ptr",))


def lora_shrink(x: torch.Tensor, a: torch.Tensor, ranks: torch.Tensor, table: SegmentTable,
                h: torch.Tensor, rank_bound: int) -> None:
    """h[rows, :r] = x[rows] · a[slot, :r]ᵀ (fp32) for every segment; columns beyond a slot's rank untouched.
    x [N, in] (unit column stride); a [slots, R, in]; h [N, ≥ rank_bound] fp32; ranks [slots] int32."""
    if table.num == 0:
        return
    len_bucket = next_pow2(table.max_len)

    def grid(meta: dict) -> tuple[int, int, int]:
        return table.num, triton.cdiv(rank_bound, meta["BLOCK_R"]), triton.cdiv(table.max_len, meta["BLOCK_M"])

    _SHRINK(grid, x, a, h, ranks, table.starts, table.lengths, table.slots, x.shape[1], x.stride(0),
            a.stride(0), a.stride(1), h.stride(0), len_bucket, rank_bound,
            DOT_F32=INTERPRET, PRECISION=dot_precision(x.dtype))


def lora_expand(h: torch.Tensor, bt: torch.Tensor, ranks: torch.Tensor, table: SegmentTable, y: torch.Tensor,
                rank_bound: int) -> None:
    """y[rows] += h[rows, :r] · bt[slot, :r] for every segment (fp32 accumulation, one rounding into y).
    h [N, ≥ rank_bound] fp32; bt [slots, R, out]; y [N, out] (unit column stride)."""
    if table.num == 0:
        return
    len_bucket = next_pow2(table.max_len)

    def grid(meta: dict) -> tuple[int, int, int]:
        return table.num, triton.cdiv(table.max_len, meta["BLOCK_M"]), triton.cdiv(y.shape[1], meta["BLOCK_N"])

    _EXPAND(grid, h, bt, y, ranks, table.starts, table.lengths, table.slots, y.shape[1], h.stride(0),
            bt.stride(0), bt.stride(1), y.stride(0), len_bucket, rank_bound,
            DOT_F32=INTERPRET, PRECISION=dot_precision(bt.dtype))
