"""PEFT prefix tuning: adapter_config.json with "peft_type": "PREFIX_TUNING" plus adapter_model.safetensors.

The file holds one tensor, `prompt_embeddings` [P, L*2*H_kv*hd]: the final per-layer keys/values. PEFT 0.21
saves `get_prompt_embedding_to_save()`, i.e. the prefix encoder's *output*, so with `prefix_projection` the MLP
has already been applied and nothing is left to evaluate here (its weights are never saved). Layout, as PEFT's
`get_prompt` reads it: view(P, 2L, H_kv, hd); layer l's keys are slot 2l and its values slot 2l+1. PEFT puts
them in the KV cache ahead of the request, unrotated, so the request's tokens take positions P..P+T-1.
"""

from __future__ import annotations

from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

from adapters_store.errors import AdapterError
from adapters_store.formats.common import positive_int, served_tensor, unsupported
from adapters_store.safetensors_io import find_weights, read_tensors
from adapters_store.spec import ModelSpec
from adapters_store.types import AdapterWeights, PrefixParts

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
TENSOR = "prompt_embeddings"
# Options that do not change the prefix at inference (metadata, or how the saved tensor was produced).
_IGNORED = frozenset({
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "encoder_hidden_size", "prefix_projection", "init_weights",
})
_SIZES = ("num_virtual_tokens", "num_layers", "num_attention_heads", "token_dim")


class PeftPrefixReader:
    """Reads PEFT prefix-tuning adapters (peft_type "PREFIX_TUNING") for a decoder-only Llama-like model."""

    name = "peft_prefix"

    def matches(self, config: Mapping[str, Any]) -> bool:
        return config.get("peft_type") == "PREFIX_TUNING"

    def read(self, name: str, path: str | PathLike[str], config: dict, spec: ModelSpec) -> AdapterWeights:
        directory = Path(path)
        sizes = _check_config(name, directory / CONFIG_FILE, config, spec)
        file = find_weights(name, directory, WEIGHTS_FILE)
        tensors = read_tensors(name, file)
        extra = sorted(set(tensors) - {TENSOR})
        if extra:
            raise AdapterError("unsupported_option", f"{file.name} holds {extra[0]!r}; a PEFT prefix adapter holds "
                               f"only {TENSOR!r} (the final keys/values)", adapter=name, path=str(file))
        if TENSOR not in tensors:
            raise AdapterError("missing_weights", f"{file.name} has no {TENSOR!r} tensor", adapter=name,
                               path=str(file))
        p, layers, heads, head_dim = sizes
        flat = served_tensor(name, file, TENSOR, tensors[TENSOR], (p, layers * 2 * heads * head_dim), spec.dtype,
                             f"num_virtual_tokens {p} x num_layers {layers} * 2 * {heads} kv heads * head dim "
                             f"{head_dim}")
        slots = flat.view(p, 2 * layers, heads, head_dim)
        keys = slots[:, 0::2].permute(1, 0, 2, 3).contiguous()  # [L, P, H_kv, hd]
        values = slots[:, 1::2].permute(1, 0, 2, 3).contiguous()
        parts = {"prefix": PrefixParts(keys=keys, values=values, positions="shifted")}
        return AdapterWeights(name=name, path=str(directory), format=self.name, parts=parts, config=dict(config))


def _check_config(adapter: str, file: Path, config: Mapping[str, Any], spec: ModelSpec) -> tuple[int, int, int, int]:
    """(P, layers, kv heads, head dim) from the config, checked against the served model."""
    if config.get("num_transformer_submodules", 1) != 1:
        raise unsupported(adapter, file, "num_transformer_submodules", config["num_transformer_submodules"],
                          "prefixes for encoder-decoder models are not supported")
    if config.get("modules_to_save"):
        raise unsupported(adapter, file, "modules_to_save", config["modules_to_save"],
                          "full copies of modules (e.g. a classification head) are not applied by this server")
    for option in sorted(set(config) - _IGNORED - set(_SIZES) - {"num_transformer_submodules", "modules_to_save"}):
        if config[option]:
            raise unsupported(adapter, file, option, config[option], "an option this server does not know; "
                              "it cannot tell whether it changes the adapter's output")
    p, layers, heads, token_dim = (positive_int(adapter, file, key, config.get(key)) for key in _SIZES)
    if layers != spec.num_layers:
        raise AdapterError("shape_mismatch", f"{file.name} sets num_layers={layers}, but the served model has "
                           f"{spec.num_layers} layers ({spec.describe()})", adapter=adapter, path=str(file))
    if heads != spec.num_kv_heads or token_dim != spec.num_kv_heads * spec.head_dim:
        raise AdapterError("shape_mismatch", f"{file.name} sets num_attention_heads={heads}, token_dim={token_dim}; "
                           f"the served model's keys/values have {spec.num_kv_heads} heads of {spec.head_dim} "
                           f"(token_dim {spec.num_kv_heads * spec.head_dim})", adapter=adapter, path=str(file))
    return p, layers, heads, spec.head_dim
