"""PEFT LoRA: adapter_config.json with "peft_type": "LORA" plus adapter_model.safetensors.

The weights file is the truth for which modules are adapted: every tensor must be the lora_A or
lora_B weight of a linear of the served model that the config targets, with the configured rank.
"""

from __future__ import annotations

from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import torch

from adapters_store.errors import AdapterError
from adapters_store.formats.common import to_served
from adapters_store.formats.peft_lora_config import LoraSettings, check_options, parse_settings
from adapters_store.safetensors_io import find_weights, read_tensors
from adapters_store.spec import ModelSpec
from adapters_store.types import AdapterWeights, LoraModule, LoraParts

WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_SIDES = ((".lora_A.weight", "A"), (".lora_B.weight", "B"))
# Tensor kinds PEFT may save next to plain LoRA, and the option that produced them.
_REFUSED_TENSORS = (
    (".lora_embedding_A", "embedding LoRA (lora_embedding_A/B on an embedding layer)"),
    (".lora_embedding_B", "embedding LoRA (lora_embedding_A/B on an embedding layer)"),
    (".lora_magnitude_vector", "use_dora (DoRA magnitude vector)"),
    (".trainable_tokens_", "trainable_token_indices (trainable token embeddings)"),
    (".lora_A.bias", "lora_bias (a bias on the LoRA factors)"),
    (".lora_B.bias", "lora_bias (a bias on the LoRA factors)"),
)


class PeftLoraReader:
    """Reads PEFT LoRA adapters (peft_type "LORA") on the linears of a Llama-like model."""

    name = "peft_lora"

    def matches(self, config: Mapping[str, Any]) -> bool:
        return config.get("peft_type") == "LORA"

    def read(self, name: str, path: str | PathLike[str], config: dict, spec: ModelSpec) -> AdapterWeights:
        directory = Path(path)
        if config.get("peft_type") != "LORA":
            raise AdapterError("unsupported_option", f"adapter_config.json sets peft_type="
                               f"{config.get('peft_type')!r}; the {self.name} reader reads only 'LORA'",
                               adapter=name, path=str(directory))
        try:
            check_options(name, config)
            settings = parse_settings(name, config)
        except AdapterError as exc:
            exc.path = str(directory / "adapter_config.json")
            raise
        file = find_weights(name, directory, WEIGHTS_FILE)
        pairs = _pair(name, file, read_tensors(name, file))
        modules = {module: _lora_module(name, file, module, a, b, settings, spec)
                   for module, (a, b) in sorted(pairs.items())}
        return AdapterWeights(name=name, path=str(directory), format=self.name,
                              parts={"lora": LoraParts(modules)}, config=dict(config))


def _refuse_known_kinds(adapter: str, file: Path, keys: list[str]) -> None:
    """Names the option behind a tensor kind we cannot apply (checked first: its message is the clearest)."""
    for key in keys:
        for marker, option in _REFUSED_TENSORS:
            if marker in key:
                raise AdapterError("unsupported_option", f"{file.name} holds {key!r}: {option} is not supported",
                                   adapter=adapter, path=str(file))


def _split_key(adapter: str, file: Path, key: str) -> tuple[str, str]:
    """(module path, "A" or "B") of a LoRA tensor key; refuses every other kind of tensor."""
    for suffix, side in _SIDES:
        if key.startswith(_PREFIX) and key.endswith(suffix):
            return key[len(_PREFIX):-len(suffix)], side
    raise AdapterError("unsupported_option", f"{file.name} holds {key!r}, which is not a LoRA weight "
                       f"({_PREFIX}<module>.lora_A.weight / .lora_B.weight); full module weights or biases "
                       "(modules_to_save, bias, saved embedding layers) are not applied by this server",
                       adapter=adapter, path=str(file))


def _pair(adapter: str, file: Path, tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Groups lora_A/lora_B tensors by module path; every A needs its B and vice versa."""
    _refuse_known_kinds(adapter, file, list(tensors))
    sides: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, side = _split_key(adapter, file, key)
        sides.setdefault(module, {})[side] = tensor
    if not sides:
        raise AdapterError("missing_weights", f"{file.name} holds no tensors", adapter=adapter, path=str(file))
    pairs = {}
    for module, found in sides.items():
        if len(found) != 2:
            have, lack = ("A", "B") if "A" in found else ("B", "A")
            raise AdapterError("missing_weights", f"{file.name} has lora_{have} but no lora_{lack} for {module!r}",
                               adapter=adapter, path=str(file))
        pairs[module] = (found["A"], found["B"])
    return pairs


def _lora_module(adapter: str, file: Path, module: str, a: torch.Tensor, b: torch.Tensor,
                 settings: LoraSettings, spec: ModelSpec) -> LoraModule:
    """Validates one module's pair against the served model and the config, in the served dtype."""
    if module not in spec.linears:
        raise AdapterError("unknown_module", f"{file.name} has LoRA tensors for {module!r}, which is not a linear "
                           f"of the served model ({spec.describe()})", adapter=adapter, path=str(file))
    if not settings.targeting.targets(module):
        t = settings.targeting
        raise AdapterError("untargeted_module", f"{file.name} has LoRA tensors for {module!r}, which "
                           f"adapter_config.json does not target (target_modules={t.target_modules!r}, "
                           f"exclude_modules={t.exclude_modules!r}, layers_to_transform={t.layers_to_transform!r})",
                           adapter=adapter, path=str(file))
    in_features, out_features = spec.linears[module]
    r = settings.rank(module)
    for side, tensor, expected in (("A", a, (r, in_features)), ("B", b, (out_features, r))):
        key = f"{_PREFIX}{module}.lora_{side}.weight"
        if not tensor.is_floating_point():
            raise AdapterError("bad_dtype", f"tensor {key!r} in {file.name} has dtype {tensor.dtype}, not a "
                               "floating-point type", adapter=adapter, path=str(file))
        if tuple(tensor.shape) != expected:
            raise AdapterError("shape_mismatch", f"tensor {key!r} in {file.name} has shape {list(tensor.shape)}, "
                               f"expected {list(expected)} (rank {r} from {settings.rank_source(module)}; "
                               f"{module} maps {in_features} -> {out_features} in the served model)",
                               adapter=adapter, path=str(file))
    return LoraModule(a=to_served(adapter, file, f"{module}.lora_A.weight", a, spec.dtype),
                      b=to_served(adapter, file, f"{module}.lora_B.weight", b, spec.dtype),
                      scale=float(settings.scale(module)))
