"""Loads the frozen base model and its tokenizer from a Hugging Face directory (or the default)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from server.config import MAX_PREFIX_TOKENS
from server.model.default_model import MODEL_ID, default_model_dir
from server.model.llama import CausalLM
from server.model.shape import ModelShape

log = logging.getLogger("deltaserve.model")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """The frozen model with what the engine needs to know about it."""

    model: CausalLM
    tokenizer: Any
    shape: ModelShape
    model_id: str
    path: Path
    device: torch.device
    dtype: torch.dtype
    eos_token_ids: frozenset[int]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def resolve_model_dir(model: str, cache_dir: str) -> tuple[Path, str]:
    if model == "default":
        return default_model_dir(cache_dir), MODEL_ID
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    return path, path.name


def load_model(model: str, cache_dir: str, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Loads weights into our CausalLM (eval mode, no grad, one copy on the target device)."""
    from transformers import AutoConfig, AutoTokenizer

    path, model_id = resolve_model_dir(model, cache_dir)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    hf_config = AutoConfig.from_pretrained(path)
    shape = ModelShape.from_hf_config(hf_config)
    cos, sin = rope_tables(hf_config, shape.max_position_embeddings + MAX_PREFIX_TOKENS)
    start = time.perf_counter()
    with torch.device("meta"):
        net = CausalLM(shape, cos, sin)
    net = net.to_empty(device=dev)
    net.rope_cos.copy_(cos)
    net.rope_sin.copy_(sin)
    _load_weights(net, path, dt, dev)
    net = net.to(dtype=dt)
    net.rope_cos.data = cos.to(dev, dt)
    net.rope_sin.data = sin.to(dev, dt)
    net.eval().requires_grad_(False)
    log.info("loaded %s (%s, %s on %s) in %.2fs", model_id, shape.architecture, dt, dev,
             time.perf_counter() - start)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return LoadedModel(net, tokenizer, shape, model_id, path, dev, dt, _eos_ids(path, hf_config, tokenizer))


def rope_tables(hf_config: Any, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_positions, head_dim] from Hugging Face's own rotary embedding (all rope types)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rotary = LlamaRotaryEmbedding(hf_config)
    positions = torch.arange(max_positions).unsqueeze(0)
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    return cos[0].float(), sin[0].float()


def _load_weights(net: CausalLM, path: Path, dtype: torch.dtype, device: torch.device) -> None:
    params = dict(net.named_parameters())
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {path} (pickled weights are never loaded)")
    seen: set[str] = set()
    for file in tqdm(files, desc="loading weights", disable=len(files) < 2):
        with safe_open(file, framework="pt", device="cpu") as f:
            for key in f.keys():
                if key not in params:
                    continue
                tensor = f.get_tensor(key)
                if tuple(tensor.shape) != tuple(params[key].shape):
                    raise ValueError(f"{key}: checkpoint shape {tuple(tensor.shape)} != "
                                     f"model shape {tuple(params[key].shape)}")
                params[key].data = tensor.to(device=device, dtype=dtype)
                seen.add(key)
    if net.shape.tie_word_embeddings or "lm_head.weight" not in seen:
        net.lm_head.weight = net.model.embed_tokens.weight
        seen.add("lm_head.weight")
    missing = sorted(set(params) - seen)
    if missing:
        raise ValueError(f"checkpoint in {path} lacks {len(missing)} tensors, e.g. {missing[:3]}")


def _eos_ids(path: Path, hf_config: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    gen_file = path / "generation_config.json"
    sources = [getattr(hf_config, "eos_token_id", None), tokenizer.eos_token_id]
    if gen_file.is_file():
        sources.append(json.loads(gen_file.read_text()).get("eos_token_id"))
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)
