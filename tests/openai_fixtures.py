"""Adapters for the OpenAI-API tests, written straight to disk for the default model: a PEFT LoRA and a PEFT
prefix (random weights strong enough to change greedy text), and the clients' settings."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig

from benchmarks.lora_fixtures import ALL_LINEARS, write_peft_lora
from server.model.shape import ModelShape

MODEL_ID = "SmolLM2-135M-Instruct"


def default_shape(model_dir: Path) -> ModelShape:
    return ModelShape.from_hf_config(AutoConfig.from_pretrained(model_dir))


def write_peft_prefix(out_dir: Path, shape: ModelShape, tokens: int, seed: int) -> Path:
    """A PEFT prefix-tuning adapter (no projection): `prompt_embeddings` [P, layers * 2 * kv heads * head dim]."""
    gen = torch.Generator().manual_seed(seed)
    width = shape.num_layers * 2 * shape.num_kv_heads * shape.head_dim
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({"prompt_embeddings": torch.randn(tokens, width, generator=gen)},
              str(out_dir / "adapter_model.safetensors"))
    config = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": tokens,
              "num_layers": shape.num_layers, "num_attention_heads": shape.num_kv_heads,
              "token_dim": shape.num_kv_heads * shape.head_dim, "prefix_projection": False,
              "inference_mode": True}
    (out_dir / "adapter_config.json").write_text(json.dumps(config))
    return out_dir


def write_adapters(root: Path, model_dir: Path) -> Path:
    """root/lora (every linear, r=4) and root/prefix (8 virtual tokens)."""
    shape = default_shape(model_dir)
    write_peft_lora(root / "lora", shape, 4, ALL_LINEARS, seed=1, alpha=64.0 * 4)
    write_peft_prefix(root / "prefix", shape, 8, seed=2)
    return root
