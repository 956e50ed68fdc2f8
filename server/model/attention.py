"""Paged KV cache and attention over it, in plain torch (the CPU path and the reference)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from server.kernels.interface import KernelBackend
from server.kernels.registry import select_backend
from server.model.batch import BatchDescriptor


@dataclass
class KVLayer:
    """One layer's view of the cache, with the shared decode gather workspace and the device's kernels."""

    k: torch.Tensor         # [num_blocks * block_size, kv_heads, head_dim]
    v: torch.Tensor
    gather_k: torch.Tensor  # [max_batch * max_blocks, block_size * kv_heads * head_dim]
    gather_v: torch.Tensor
    kernels: KernelBackend  # decode attention over the blocks (server/kernels: chosen once, by device)


class PagedKVCache:
    """Preallocated keys and values for every layer, addressed by block.

    Storage is [layers, 2, (num_blocks + 1) * block_size, kv_heads, head_dim]; a token's flat slot is
    block_id * block_size + offset. Allocated once at start-up, never resized. The last block is no sequence's:
    the padding rows of a captured decode step write and read there (`scratch_block`).
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device, max_batch: int, max_len: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        # Zeroed, so every page is resident from the start: no page faults on the hot path.
        self.scratch_block = num_blocks
        self.storage = torch.zeros(num_layers, 2, (num_blocks + 1) * block_size, num_kv_heads, head_dim,
                                   dtype=dtype, device=device)
        # Decode gathers each sequence's blocks here instead of into fresh allocations every layer; `max_len` counts
        # every token a sequence's block table reaches (shared blocks in front included).
        self.max_blocks = max_blocks = -(-max_len // block_size)   # the longest block table
        shape = (max_batch * max_blocks, block_size * num_kv_heads * head_dim)
        self.gather_k = torch.empty(shape, dtype=dtype, device=device)
        self.gather_v = torch.empty(shape, dtype=dtype, device=device)
        self.kernels = select_backend(device)

    def write_blocks(self, blocks: list[int], keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys, values [layers, T, kv_heads, head_dim] into the first T token slots of `blocks`, in order."""
        if keys.shape[1] > len(blocks) * self.block_size:
            raise ValueError(f"{keys.shape[1]} tokens do not fit {len(blocks)} blocks")
        slots = torch.tensor([b * self.block_size + i for b in blocks for i in range(self.block_size)],
                             device=self.storage.device)[:keys.shape[1]]
        self.storage[:, 0, slots] = keys.to(self.storage.dtype)
        self.storage[:, 1, slots] = values.to(self.storage.dtype)

    def layer(self, index: int) -> KVLayer:
        return KVLayer(self.storage[index, 0], self.storage[index, 1], self.gather_k, self.gather_v, self.kernels)

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

    Returns [num_tokens, heads, hd]. Prefill rows attend causally to their own new tokens and, when the sequence
    has tokens cached before them (earlier chunks, cached prefix blocks, an adapter's shared blocks), to those,
    read back from the cache; decode rows attend to their whole cached context (this step's token already
    written), shared blocks included.
    """
    if batch.decode_is_all:
        return _decode(q, kv, batch, scale)
    out = torch.empty_like(q)
    for index, (start, length) in enumerate(batch.prefill_ranges):
        rows = slice(start, start + length)
        context = batch.prefill_context[index] if batch.prefill_context else None
        if context is None:
            out[rows] = _prefill(q[rows], k[rows], v[rows], scale, None)
        else:   # keys/values of everything the sequence sees so far, from the cache
            out[rows] = _prefill(q[rows], kv.k[context], kv.v[context], scale, batch.prefill_masks[index])
    if batch.num_decode:
        rows = batch.decode_rows
        out[rows] = _decode(q[rows], kv, batch, scale)
    return out


def _prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
             mask: torch.Tensor | None) -> torch.Tensor:
    """q [T, H, hd] are the last T of the S tokens whose keys/values k, v [S, kvh, hd] are given (S > T when
    tokens are cached before them, with mask [T, S]: query i sees keys 0..S-T+i); causal when mask is None."""
    # [T, H, hd] -> [1, H, T, hd]
    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=mask is None, scale=scale,
                                         enable_gqa=True)
    return out.squeeze(0).transpose(0, 1)


def _decode(q: torch.Tensor, kv: KVLayer, batch: BatchDescriptor, scale: float) -> torch.Tensor:
    """q [B, H, hd] of the decode rows -> [B, H, hd], over each row's block table (its adapter's shared blocks,
    then its own)."""
    return kv.kernels.decode_attention(q, kv.k, kv.v, batch.decode_block_tables, batch.decode_visibility,
                                       batch.block_size, scale, workspace=(kv.gather_k, kv.gather_v))
