"""Paged decode attention in Triton: one program per (decode row, KV head) reads that row's visible blocks
straight from the cache through its block table (no gather into a workspace), with an online softmax in fp32.

A row sees table positions [0, prefix_len) (an adapter's shared prefix blocks) and [own_start, own_start + length)
(its own tokens); blocks with nothing visible are skipped without a load. The query heads sharing a KV head are
taken together (GQA: K/V read once per KV head, never copied per query head).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from server.kernels.triton_common import next_pow2


@triton.jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, prefix_ptr, own_ptr, len_ptr,
                             max_blocks, scale, group, head_dim,
                             stride_qb, stride_qh, stride_kt, stride_kh, stride_tb, stride_ob, stride_oh,
                             BLOCK: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    prefix = tl.load(prefix_ptr + b)
    own = tl.load(own_ptr + b)
    end = own + tl.load(len_ptr + b)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    g_ok = g < group
    d_ok = d < head_dim
    heads = kvh * group + g
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32) * scale        # [G, D]
    m = tl.full((G_PAD,), float("-inf"), dtype=tl.float32)
    denom = tl.zeros((G_PAD,), dtype=tl.float32)
    acc = tl.zeros((G_PAD, D_PAD), dtype=tl.float32)
    offs = tl.arange(0, BLOCK)
    for j in range(0, max_blocks):
        p0 = j * BLOCK
        if (p0 < prefix) | ((p0 + BLOCK > own) & (p0 < end)):
            block = tl.load(tables_ptr + b.to(tl.int64) * stride_tb + j).to(tl.int64)
            pos = p0 + offs
            vis = (pos < prefix) | ((pos >= own) & (pos < end))                              # [BLOCK]
            kv_off = (block * BLOCK + offs)[:, None] * stride_kt + kvh * stride_kh + d[None, :]
            kv_mask = vis[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)              # [BLOCK, D]
            v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)                                 # [G, BLOCK]
            s = tl.where(vis[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            denom = denom * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)       # [G, D]
            m = m_new
    out = acc / tl.where(denom > 0, denom, 1.0)[:, None]
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                           prefix_lens: torch.Tensor, own_starts: torch.Tensor, lengths: torch.Tensor,
                           block_size: int, scale: float) -> torch.Tensor:
    """q [B, H, hd]; k_cache, v_cache [num_blocks * block_size, kvh, hd] (unit stride on hd); tables [B, max_blocks]
    int; prefix_lens, own_starts, lengths [B] int32. Returns [B, H, hd] in q's dtype."""
    num_seqs, num_heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    if block_size & (block_size - 1):
        raise ValueError(f"the Triton decode attention needs a power-of-two block size, not {block_size}")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(2) != 1 or q.stride(2) != 1:
        raise ValueError("keys and values must share strides, with unit stride on the head dimension")
    out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    group = num_heads // kv_heads
    _decode_attention_kernel[(num_seqs, kv_heads)](
        q, k_cache, v_cache, out, tables, prefix_lens, own_starts, lengths,
        tables.shape[1], scale, group, head_dim,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), tables.stride(0), out.stride(0),
        out.stride(1), BLOCK=block_size, G_PAD=next_pow2(group), D_PAD=next_pow2(head_dim))
    return out
