"""Paged KV cache and attention over it, in plain torch (the CPU path and the reference)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from server.model.batch import BatchDescriptor


@dataclass
class KVLayer:
    """One layer's view of the cache, with the shared decode gather workspace."""

    k: torch.Tensor         # [num_blocks * block_size, kv_heads, head_dim]
    v: torch.Tensor
    gather_k: torch.Tensor  # [max_batch * max_blocks, block_size * kv_heads * head_dim]
    gather_v: torch.Tensor


class PagedKVCache:
    """Preallocated keys and values for every layer, addressed by block.

    Storage is [layers, 2, num_blocks * block_size, kv_heads, head_dim]; a token's flat slot is
    block_id * block_size + offset. Allocated once at start-up, never resized.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device, max_batch: int, max_len: int,
                 prefix_slots: int = 0, prefix_tokens: int = 0) -> None:
        self.num_blocks = num_blocks            # the pool sequences draw from
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        # After the pool, a fixed region per adapter slot holds that adapter's prefix keys/values once,
        # shared by all its requests: decode reaches them through its block table like its own tokens.
        self.prefix_blocks_per_slot = -(-prefix_tokens // block_size) if prefix_slots else 0
        total = num_blocks + prefix_slots * self.prefix_blocks_per_slot
        # Zeroed, so every page is resident from the start: no page faults on the hot path.
        self.storage = torch.zeros(num_layers, 2, total * block_size, num_kv_heads, head_dim,
                                   dtype=dtype, device=device)
        # Decode gathers each sequence's blocks here instead of into fresh allocations every layer.
        max_blocks = -(-max_len // block_size) + self.prefix_blocks_per_slot
        shape = (max_batch * max_blocks, block_size * num_kv_heads * head_dim)
        self.gather_k = torch.empty(shape, dtype=dtype, device=device)
        self.gather_v = torch.empty(shape, dtype=dtype, device=device)

    def prefix_blocks(self, slot: int, num_tokens: int) -> list[int]:
        """The block ids that hold slot `slot`'s prefix of `num_tokens` tokens."""
        first = self.num_blocks + slot * self.prefix_blocks_per_slot
        return list(range(first, first + -(-num_tokens // self.block_size)))

    def write_prefix(self, slot: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys, values [layers, P, kv_heads, head_dim] into the slot's prefix region (never rotated)."""
        if keys.shape[1] > self.prefix_blocks_per_slot * self.block_size:
            raise ValueError(f"a prefix of {keys.shape[1]} tokens does not fit the reserved region")
        start = (self.num_blocks + slot * self.prefix_blocks_per_slot) * self.block_size
        self.storage[:, 0, start:start + keys.shape[1]] = keys
        self.storage[:, 1, start:start + values.shape[1]] = values

    def layer(self, index: int) -> KVLayer:
        return KVLayer(self.storage[index, 0], self.storage[index, 1], self.gather_k, self.gather_v)

    @property
    def nbytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()


def write_kv(kv: KVLayer, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Stores this step's keys/values [num_tokens, kv_heads, head_dim] at their slots."""
    kv.k.index_copy_(0, slot_mapping, k)
    kv.v.index_copy_(0, slot_mapping, v)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: KVLayer, batch: BatchDescriptor,
                    scale: float, layer: int) -> torch.Tensor:
    """Attention for a mixed step. q [num_tokens, heads, hd]; k, v [num_tokens, kv_heads, hd].

    Returns [num_tokens, heads, hd]. Prefill rows attend causally to their own new tokens (a later chunk
    of a prompt also to its earlier chunks, read back from the cache);
    decode rows attend to their whole cached context (this step's token already written). Rows
    with joined keys/values (prefix tuning) also attend to those, in front, always visible.
    """
    joined = batch.joined_kv
    if batch.decode_is_all:
        return _decode(q, kv, batch, scale, joined.decode(layer) if joined else None)
    out = torch.empty_like(q)
    for index, (start, length) in enumerate(batch.prefill_ranges):
        rows = slice(start, start + length)
        extra = joined.prefill(layer, index) if joined else None
        context = batch.prefill_context[index] if batch.prefill_context else None
        if context is None:
            out[rows] = _prefill(q[rows], k[rows], v[rows], scale, extra)
        else:   # a later chunk: the keys/values of the whole sequence so far, from the cache
            out[rows] = _prefill(q[rows], kv.k[context], kv.v[context], scale, extra)
    if batch.num_decode:
        rows = batch.decode_rows
        out[rows] = _decode(q[rows], kv, batch, scale, joined.decode(layer) if joined else None)
    return out


def _prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
             extra: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """q [T, H, hd] are the last T of the S tokens whose keys/values k, v [S, kvh, hd] are given (S > T for a
    later chunk of a prompt): query i sees keys 0..S-T+i, and every joined key in front."""
    mask = None
    length, context = q.shape[0], k.shape[0] - q.shape[0]
    if extra is not None or context:
        # [T, P + S]: the joined keys first, visible to every query; causal among the real tokens.
        num_extra = extra[0].shape[0] if extra is not None else 0
        if extra is not None:
            k, v = torch.cat((extra[0], k)), torch.cat((extra[1], v))
        causal = torch.ones(length, context + length, dtype=torch.bool, device=q.device).tril(context)
        mask = torch.cat((torch.ones(length, num_extra, dtype=torch.bool, device=q.device), causal), dim=1)
    # [T, H, hd] -> [1, H, T, hd]
    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=mask is None, scale=scale,
                                         enable_gqa=True)
    return out.squeeze(0).transpose(0, 1)


def _decode(q: torch.Tensor, kv: KVLayer, batch: BatchDescriptor, scale: float,
            extra: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    num_seqs, num_heads, head_dim = q.shape
    kv_heads = kv.k.shape[1]
    tables = batch.decode_block_tables                     # [B, max_blocks]
    max_len = tables.shape[1] * batch.block_size
    flat = tables.reshape(-1)                              # [B * max_blocks]
    row = batch.block_size * kv_heads * head_dim
    k = torch.index_select(kv.k.view(-1, row), 0, flat, out=kv.gather_k[:flat.shape[0]])
    v = torch.index_select(kv.v.view(-1, row), 0, flat, out=kv.gather_v[:flat.shape[0]])
    k = k.view(num_seqs, max_len, kv_heads, head_dim).transpose(1, 2)  # [B, kvh, L, hd]
    v = v.view(num_seqs, max_len, kv_heads, head_dim).transpose(1, 2)
    mask = batch.decode_mask
    if extra is not None:
        k, v = torch.cat((extra[0], k), dim=2), torch.cat((extra[1], v), dim=2)  # [B, kvh, P + L, hd]
        mask = torch.cat((extra[2], mask), dim=3)
    # Grouped-query attention without copying K/V: the query heads sharing a KV head become
    # that head's query rows. Head h uses KV head h // group, as in Hugging Face's repeat_kv.
    group = num_heads // kv_heads
    qg = q.view(num_seqs, kv_heads, group, head_dim)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
    return out.reshape(num_seqs, num_heads, head_dim)
