"""Writes PEFT-format LoRA adapters straight to disk (fast; what `save_pretrained` would write)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QV = ("q_proj", "v_proj")


def linear_shapes(hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int) -> dict[str, tuple[
        str, int, int]]:
    """module name -> (parent, in, out) for one Llama decoder layer."""
    return {
        "q_proj": ("self_attn", hidden, heads * head_dim), "k_proj": ("self_attn", hidden, kv_heads * head_dim),
        "v_proj": ("self_attn", hidden, kv_heads * head_dim), "o_proj": ("self_attn", heads * head_dim, hidden),
        "gate_proj": ("mlp", hidden, intermediate), "up_proj": ("mlp", hidden, intermediate),
        "down_proj": ("mlp", intermediate, hidden),
    }


def write_peft_lora(out_dir: Path, shape: object, rank: int, targets: tuple[str, ...], seed: int,
                    alpha: float | None = None) -> Path:
    """A PEFT LoRA adapter for a model of `shape` (a ModelShape) with random A and small random B."""
    shapes = linear_shapes(shape.hidden_size, shape.intermediate_size, shape.num_heads,  # type: ignore[attr-defined]
                           shape.num_kv_heads, shape.head_dim)  # type: ignore[attr-defined]
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(shape.num_layers):  # type: ignore[attr-defined]
        for name in targets:
            parent, fan_in, fan_out = shapes[name]
            key = f"base_model.model.model.layers.{layer}.{parent}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) / fan_in ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * 0.02
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha or 2 * rank,
              "target_modules": list(targets), "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
              "fan_in_fan_out": False, "base_model_name_or_path": None, "inference_mode": True}
    (out_dir / "adapter_config.json").write_text(json.dumps(config))
    return out_dir
