"""A fused, rank-exact bottleneck adapter in Triton: block_out[rows] += act(x·downᵀ + b_down)·up_t + b_up.

One program takes a block of one segment's rows through the whole adapter: the hidden activations [rows, r] stay
in registers between the down and the up projection (no round trip through memory), the slot's input (sub-layer
input, sub-layer output or block output) and activation are read per slot, and weight rows beyond the slot's rank
are never loaded. A program reads every column of its rows before it writes any (block_output as input is exact).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from adapters_store.types import ACTIVATIONS, BOTTLENECK_INPUTS
from server.kernels.triton_common import INTERPRET, Launcher, SegmentTable, dot_precision, next_pow2

# The kernel's activation codes, in this order: the store's order, since sites write indices into ACTIVATIONS
# (checked at import).
ACTIVATION_CODES = ("relu", "gelu", "gelu_new", "silu", "tanh", "sigmoid", "identity")
if ACTIVATION_CODES != tuple(ACTIVATIONS):
    raise ImportError(f"the Triton bottleneck kernel knows {ACTIVATION_CODES}, the store {ACTIVATIONS}")
INPUT_CODES = tuple(BOTTLENECK_INPUTS)   # sublayer_input, sublayer_output, block_output


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _activate(x, code):
    if code == 0:
        y = tl.maximum(x, 0.0)
    elif code == 1:
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif code == 2:
        y = 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    elif code == 3:
        y = x * tl.sigmoid(x)
    elif code == 4:
        y = _tanh(x)
    elif code == 5:
        y = tl.sigmoid(x)
    else:
        y = x
    return y


@triton.jit
def _load_input(in0_ptr, in1_ptr, in2_ptr, offsets, mask, source):
    """The slot's input tile: sub-layer input (0), sub-layer output (1) or block output (2)."""
    if source == 0:
        xt = tl.load(in0_ptr + offsets, mask=mask, other=0.0)
    elif source == 1:
        xt = tl.load(in1_ptr + offsets, mask=mask, other=0.0)
    else:
        xt = tl.load(in2_ptr + offsets, mask=mask, other=0.0)
    return xt


@triton.jit
def _bottleneck_kernel(in0_ptr, in1_ptr, in2_ptr, down_ptr, dbias_ptr, up_ptr, ubias_ptr,
                       ranks_ptr, input_codes_ptr, act_codes_ptr, starts_ptr, lens_ptr, slots_ptr,
                       hidden, stride_m, stride_ds, stride_dr, stride_dbs, stride_us, stride_ur, stride_ubs,
                       len_bucket, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    seg = tl.program_id(0)
    m0 = tl.program_id(1) * BLOCK_M
    slot = tl.load(slots_ptr + seg)
    rank = tl.load(ranks_ptr + slot)
    length = tl.load(lens_ptr + seg)
    if (rank > 0) & (m0 < length):
        start = tl.load(starts_ptr + seg)
        source = tl.load(input_codes_ptr + slot)
        act_code = tl.load(act_codes_ptr + slot)
        rows = m0 + tl.arange(0, BLOCK_M)
        rs = tl.arange(0, R_PAD)
        row_ok = rows < length
        r_ok = rs < rank
        row_off = (start + rows).to(tl.int64)[:, None] * stride_m
        down_rows = down_ptr + slot.to(tl.int64) * stride_ds + rs[None, :] * stride_dr
        hid = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            xt = _load_input(in0_ptr, in1_ptr, in2_ptr, row_off + k[None, :],
                             row_ok[:, None] & (k < hidden)[None, :], source)                 # [BM, BK]
            dt = tl.load(down_rows + k[:, None], mask=r_ok[None, :] & (k < hidden)[:, None], other=0.0)  # [BK, R]
            if DOT_F32:
                xt = xt.to(tl.float32)
                dt = dt.to(tl.float32)
            hid += tl.dot(xt, dt, input_precision=PRECISION)
        hid += tl.load(dbias_ptr + slot.to(tl.int64) * stride_dbs + rs, mask=r_ok, other=0.0).to(tl.float32)[None, :]
        act = tl.where(r_ok[None, :], _activate(hid, act_code), 0.0)                    # [BM, R] fp32
        up_rows = up_ptr + slot.to(tl.int64) * stride_us + rs[:, None] * stride_ur
        if not DOT_F32:
            act = act.to(up_ptr.dtype.element_ty)
        for n0 in range(0, hidden, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_ok = n < hidden
            ut = tl.load(up_rows + n[None, :], mask=r_ok[:, None] & n_ok[None, :], other=0.0)  # [R, BN]
            if DOT_F32:
                ut = ut.to(tl.float32)
            delta = tl.dot(act, ut, input_precision=PRECISION)
            delta += tl.load(ubias_ptr + slot.to(tl.int64) * stride_ubs + n, mask=n_ok, other=0.0).to(
                tl.float32)[None, :]
            out_tile = in2_ptr + row_off + n[None, :]
            tile_ok = row_ok[:, None] & n_ok[None, :]
            out = tl.load(out_tile, mask=tile_ok, other=0.0).to(tl.float32)
            tl.store(out_tile, (out + delta).to(in2_ptr.dtype.element_ty), mask=tile_ok)


_FUSED = Launcher(
    _bottleneck_kernel,
    [triton.Config({"BLOCK_M": m, "BLOCK_K": k, "BLOCK_N": n}, num_warps=w)
     for m, k, n, w in [(16, 64, 64, 4), (16, 32, 128, 4), (32, 64, 64, 4), (64, 32, 64, 8), (16, 128, 128, 8)]],
    key=["hidden", "len_bucket", "R_PAD"], default={"BLOCK_M": 16, "BLOCK_K": 32, "BLOCK_N": 32},
    restore=("in2_ptr",))


def bottleneck_fused(sub_in: torch.Tensor, sub_out: torch.Tensor, block_out: torch.Tensor,
                     down: torch.Tensor, down_bias: torch.Tensor, up_t: torch.Tensor, up_bias: torch.Tensor,
                     ranks: torch.Tensor, input_codes: torch.Tensor, act_codes: torch.Tensor,
                     table: SegmentTable, rank_bound: int) -> None:
    """Adds every segment's adapter to its rows of block_out in place. sub_in, sub_out, block_out [N, d] with one
    row stride; down, up_t [slots, R, d]; down_bias [slots, R]; up_bias [slots, d]; ranks, input_codes (index into
    BOTTLENECK_INPUTS), act_codes (into ACTIVATION_CODES) [slots] int32; rank_bound ≥ every slot's rank."""
    if table.num == 0 or rank_bound == 0:
        return
    if not (sub_in.stride() == sub_out.stride() == block_out.stride()) or block_out.stride(1) != 1:
        raise ValueError("the bottleneck kernel needs its three inputs with one row stride and unit columns")

    def grid(meta: dict) -> tuple[int, int]:
        return table.num, triton.cdiv(table.max_len, meta["BLOCK_M"])

    _FUSED(grid, sub_in, sub_out, block_out, down, down_bias, up_t, up_bias, ranks, input_codes, act_codes,
           table.starts, table.lengths, table.slots, block_out.shape[1], block_out.stride(0), down.stride(0),
           down.stride(1), down_bias.stride(0), up_t.stride(0), up_t.stride(1), up_bias.stride(0),
           next_pow2(table.max_len), R_PAD=max(16, next_pow2(rank_bound)), DOT_F32=INTERPRET,
           PRECISION=dot_precision(block_out.dtype))
