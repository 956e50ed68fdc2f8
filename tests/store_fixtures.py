"""Helpers for adapter-store tests: tiny random Llamas, real PEFT LoRA adapters, a hook-based oracle.

Reusable elsewhere: `tiny_llama`, `make_peft_lora`, `lora_hooks`, `edit_config`, `edit_tensors`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from adapters_store.types import LoraParts

ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 256


def tiny_llama(seed: int = 0, layers: int = 2, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A randomly initialised Llama (hidden 64, 4 heads / 2 kv heads of 16, GQA), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype).eval()


def make_peft_lora(model: nn.Module, out_dir: str | Path, seed: int, **lora_config_kwargs: Any) -> Path:
    """Saves a real PEFT LoRA adapter for (a copy of) `model` in `out_dir`, with random nonzero A and B.

    PEFT initialises lora_B to zero (a no-op adapter); every `lora_*` parameter is redrawn from `seed`.
    """
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(**lora_config_kwargs))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    peft_model.save_pretrained(str(out_dir))
    return Path(out_dir)


def peft_reference(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """PEFT's own reading of a saved adapter, on a copy of `model`: the oracle."""
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(model), str(adapter_dir)).eval()


@contextmanager
def lora_hooks(model: nn.Module, lora: LoraParts) -> Iterator[nn.Module]:
    """Adds scale * x @ A.T @ B.T to each adapted nn.Linear's output of a plain HF model, while inside."""
    handles = []
    for path, module in lora.modules.items():
        def hook(_linear: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor,
                 module: Any = module) -> torch.Tensor:
            x = inputs[0]  # [..., in]
            return output + module.scale * (x @ module.a.T.to(x.dtype) @ module.b.T.to(x.dtype))

        handles.append(model.get_submodule(path).register_forward_hook(hook))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


def random_ids(seed: int = 0, batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def edit_config(adapter_dir: str | Path, **changes: Any) -> None:
    """Rewrites adapter_config.json with `changes` (a value of `...` deletes the key)."""
    path = Path(adapter_dir) / "adapter_config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def edit_tensors(adapter_dir: str | Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Loads adapter_model.safetensors, lets `edit` change the dict in place, saves it back."""
    path = Path(adapter_dir) / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def lora_key(module: str, side: str) -> str:
    """The PEFT file key of a module's lora_A ("A") or lora_B ("B") weight."""
    return f"base_model.model.{module}.lora_{side}.weight"
