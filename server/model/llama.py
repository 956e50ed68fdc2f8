"""Our forward for Llama-family causal LMs (Llama, Mistral, Qwen2) over a flat, mixed batch.

Module names equal Hugging Face's, so a checkpoint's state dict loads as is and adapter module
paths (e.g. `model.layers.3.self_attn.q_proj`) name our modules directly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from server.model.attention import KVLayer, PagedKVCache, paged_attention, write_kv
from server.model.batch import BatchDescriptor
from server.model.shape import ModelShape

# A delta hook adds its contribution to a site's output in place: hook(x, y, batch).
DeltaHook = Callable[[torch.Tensor, torch.Tensor, BatchDescriptor], None]
# A block hook adds to a sub-block's output (the residual stream after its residual add) in place:
# hook(sublayer_input, sublayer_output, block_output, batch).
BlockHook = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, BatchDescriptor], None]
SUB_BLOCKS = ("attn", "ffn")


class AdaptableLinear(nn.Linear):
    """A frozen linear whose output per-request deltas (e.g. LoRA) may add to, segment by segment."""

    def __init__(self, in_features: int, out_features: int, bias: bool, site: str) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.site = site
        self.hooks: list[DeltaHook] = []

    def forward(self, x: torch.Tensor, batch: BatchDescriptor) -> torch.Tensor:  # type: ignore[override]
        y = F.linear(x, self.weight, self.bias)
        for hook in self.hooks:
            hook(x, y, batch)
        return y


class RMSNorm(nn.Module):
    """Llama RMSNorm, computed in float32 as Hugging Face does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE, half-split layout. x [N, heads, hd]; cos, sin [N, 1, hd]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Self-attention with GQA over the paged KV cache."""

    def __init__(self, cfg: ModelShape, prefix: str, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale = self.head_dim ** -0.5
        h, q_out, kv_out = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = AdaptableLinear(h, q_out, cfg.qkv_bias, f"{prefix}.q_proj")
        self.k_proj = AdaptableLinear(h, kv_out, cfg.qkv_bias, f"{prefix}.k_proj")
        self.v_proj = AdaptableLinear(h, kv_out, cfg.qkv_bias, f"{prefix}.v_proj")
        self.o_proj = AdaptableLinear(q_out, h, cfg.o_bias, f"{prefix}.o_proj")

    def forward(self, x: torch.Tensor, batch: BatchDescriptor, cos: torch.Tensor, sin: torch.Tensor,
                kv: KVLayer) -> torch.Tensor:
        n = x.shape[0]
        q = self.q_proj(x, batch).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(x, batch).view(n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x, batch).view(n, self.num_kv_heads, self.head_dim)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        write_kv(kv, k, v, batch.slot_mapping)
        out = paged_attention(q, k, v, kv, batch, self.scale, self.layer_index)
        return self.o_proj(out.reshape(n, self.num_heads * self.head_dim), batch)


class MLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, cfg: ModelShape, prefix: str) -> None:
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = AdaptableLinear(h, i, cfg.mlp_bias, f"{prefix}.gate_proj")
        self.up_proj = AdaptableLinear(h, i, cfg.mlp_bias, f"{prefix}.up_proj")
        self.down_proj = AdaptableLinear(i, h, cfg.mlp_bias, f"{prefix}.down_proj")

    def forward(self, x: torch.Tensor, batch: BatchDescriptor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x, batch)) * self.up_proj(x, batch), batch)


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer: attention then MLP, each added to the residual stream."""

    def __init__(self, cfg: ModelShape, index: int) -> None:
        super().__init__()
        prefix = f"model.layers.{index}"
        self.index = index
        self.self_attn = Attention(cfg, f"{prefix}.self_attn", index)
        self.mlp = MLP(cfg, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.block_hooks: dict[str, list[BlockHook]] = {name: [] for name in SUB_BLOCKS}

    def forward(self, x: torch.Tensor, batch: BatchDescriptor, cos: torch.Tensor, sin: torch.Tensor,
                kv: KVLayer) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(x), batch, cos, sin, kv)
        h = x + attn
        for hook in self.block_hooks["attn"]:
            hook(x, attn, h, batch)
        mlp = self.mlp(self.post_attention_layernorm(h), batch)
        out = h + mlp
        for hook in self.block_hooks["ffn"]:
            hook(h, mlp, out, batch)
        return out


class LlamaBackbone(nn.Module):
    """`model.*` of a Llama checkpoint: embeddings, decoder layers, final norm."""

    def __init__(self, cfg: ModelShape) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """The frozen base model: forward(batch, kv_cache) -> logits of each sequence's last token."""

    def __init__(self, cfg: ModelShape, rope_cos: torch.Tensor, rope_sin: torch.Tensor) -> None:
        super().__init__()
        self.shape = cfg
        self.model = LlamaBackbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # [max_positions, head_dim] tables, computed by Hugging Face's rotary embedding for this config.
        self.register_buffer("rope_cos", rope_cos, persistent=False)
        self.register_buffer("rope_sin", rope_sin, persistent=False)

    @torch.inference_mode()
    def forward(self, batch: BatchDescriptor, kv_cache: PagedKVCache) -> torch.Tensor:
        x = self.model.embed_tokens(batch.input_ids)               # [N, hidden]
        cos = self.rope_cos[batch.positions].unsqueeze(1)          # [N, 1, hd]
        sin = self.rope_sin[batch.positions].unsqueeze(1)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, batch, cos, sin, kv_cache.layer(i))
        x = self.model.norm(x[batch.logits_indices])              # [num_seqs, hidden]
        return self.lm_head(x).float()                             # [num_seqs, vocab]

    def adaptable_linears(self) -> dict[str, AdaptableLinear]:
        return {m.site: m for m in self.modules() if isinstance(m, AdaptableLinear)}

