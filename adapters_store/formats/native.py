"""deltaserve's native format: adapter_config.json {"format": "deltaserve", "version": 1, ...} + adapter.safetensors.

It expresses every part the server applies, alone or combined (docs/native-format.md is the full reference):
- "lora": tensors lora.<module>.a [r, in] and lora.<module>.b [out, r]; config modules.<module> = {rank, scale}.
- "bottleneck": tensors bottleneck.<i>.down [r, d], .down_bias [r], .up [d, r], .up_bias [d]; config modules[i] =
  {layer, site, input, activation, scale, rank, down_bias, up_bias}.
- "prefix": tensors prefix.keys / prefix.values [L, P, H_kv, hd]; config {num_virtual_tokens, positions}.
"""

from __future__ import annotations

from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import torch

from adapters_store.errors import AdapterError
from adapters_store.formats.common import bad_config, finite_number, is_int, positive_int, served_tensor, unsupported
from adapters_store.safetensors_io import find_weights, read_tensors
from adapters_store.spec import ModelSpec
from adapters_store.types import (
    ACTIVATIONS,
    BOTTLENECK_INPUTS,
    BOTTLENECK_SITES,
    PREFIX_POSITIONS,
    AdapterWeights,
    BottleneckModule,
    BottleneckParts,
    LoraModule,
    LoraParts,
    PrefixParts,
)

FORMAT = "deltaserve"
VERSION = 1
WEIGHTS_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"
METHODS = ("lora", "bottleneck", "prefix")
# base_model key -> ModelSpec attribute it must equal
BASE_MODEL_FIELDS = {"model_type": "model_type", "num_layers": "num_layers", "hidden_size": "hidden_size",
                     "num_heads": "num_heads", "num_kv_heads": "num_kv_heads", "head_dim": "head_dim",
                     "intermediate_size": "intermediate_size", "vocab_size": "vocab_size"}
_BASE_MODEL_INFO = ("name",)
_TOP_LEVEL = {"format", "version", "base_model", "methods", "source", "description"}
_BOTTLENECK_KEYS = {"layer", "site", "input", "activation", "scale", "rank", "down_bias", "up_bias"}


def lora_keys(module: str) -> tuple[str, str]:
    return f"lora.{module}.a", f"lora.{module}.b"


def bottleneck_key(index: int, tensor: str) -> str:
    """tensor: "down", "down_bias", "up" or "up_bias"."""
    return f"bottleneck.{index}.{tensor}"


PREFIX_KEYS = ("prefix.keys", "prefix.values")


class NativeReader:
    """Reads deltaserve native adapters: any combination of LoRA, bottleneck adapters and a prefix."""

    name = "native"

    def matches(self, config: Mapping[str, Any]) -> bool:
        return config.get("format") == FORMAT

    def read(self, name: str, path: str | PathLike[str], config: dict, spec: ModelSpec) -> AdapterWeights:
        directory = Path(path)
        cfg = directory / CONFIG_FILE
        methods = _check_top_level(name, cfg, config, spec)
        file = find_weights(name, directory, WEIGHTS_FILE)
        tensors = read_tensors(name, file)
        used: set[str] = set()
        parts: dict[str, Any] = {}
        if "lora" in methods:
            parts["lora"] = _lora(name, cfg, file, methods["lora"], tensors, used, spec)
        if "bottleneck" in methods:
            parts["bottleneck"] = _bottleneck(name, cfg, file, methods["bottleneck"], tensors, used, spec)
        if "prefix" in methods:
            parts["prefix"] = _prefix(name, cfg, file, methods["prefix"], tensors, used, spec)
        extra = sorted(set(tensors) - used)
        if extra:
            raise AdapterError("untargeted_module", f"{file.name} holds {extra[0]!r}, which {CONFIG_FILE} does not "
                               f"describe ({len(extra)} such tensor(s))", adapter=name, path=str(file))
        return AdapterWeights(name=name, path=str(directory), format=self.name, parts=parts, config=dict(config))


def _check_top_level(adapter: str, cfg: Path, config: Mapping[str, Any], spec: ModelSpec) -> dict[str, Any]:
    version = config.get("version")
    if version != VERSION:
        raise unsupported(adapter, cfg, "version", version, f"this server reads native format version {VERSION}")
    extra = sorted(set(config) - _TOP_LEVEL)
    if extra:
        raise unsupported(adapter, cfg, extra[0], config[extra[0]], "not a key of the native format")
    base = config.get("base_model")
    if not isinstance(base, dict):
        raise bad_config(adapter, cfg, "base_model", f"must be an object describing the model, not {base!r}")
    for key, value in base.items():
        if key in _BASE_MODEL_INFO:
            continue
        if key not in BASE_MODEL_FIELDS:
            raise bad_config(adapter, cfg, f"base_model.{key}", f"is not one of {sorted(BASE_MODEL_FIELDS)}")
        served = getattr(spec, BASE_MODEL_FIELDS[key])
        if value != served:
            raise AdapterError("shape_mismatch", f"{cfg.name} was made for a model with {key}={value!r}, but the "
                               f"served model has {served!r} ({spec.describe()})", adapter=adapter, path=str(cfg))
    methods = config.get("methods")
    if not isinstance(methods, dict) or not methods:
        raise bad_config(adapter, cfg, "methods", f"must be a non-empty object keyed by method, not {methods!r}")
    for method, value in methods.items():
        if method not in METHODS:
            raise unsupported(adapter, cfg, f"methods.{method}", value, f"known methods: {', '.join(METHODS)}")
        if not isinstance(value, dict):
            raise bad_config(adapter, cfg, f"methods.{method}", f"must be an object, not {value!r}")
    return methods


def _take(adapter: str, file: Path, tensors: dict[str, torch.Tensor], used: set[str], key: str) -> torch.Tensor:
    if key not in tensors:
        raise AdapterError("missing_weights", f"{file.name} has no tensor {key!r}", adapter=adapter, path=str(file))
    used.add(key)
    return tensors[key]


def _lora(adapter: str, cfg: Path, file: Path, method: Mapping[str, Any], tensors: dict[str, torch.Tensor],
          used: set[str], spec: ModelSpec) -> LoraParts:
    modules = method.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise bad_config(adapter, cfg, "methods.lora.modules", f"must be a non-empty object, not {modules!r}")
    out = {}
    for module, entry in sorted(modules.items()):
        where = f"methods.lora.modules[{module!r}]"
        if not isinstance(entry, dict) or set(entry) - {"rank", "scale"}:
            raise bad_config(adapter, cfg, where, f"must be an object with rank and scale, not {entry!r}")
        if module not in spec.linears:
            raise AdapterError("unknown_module", f"{cfg.name} has LoRA for {module!r}, which is not a linear of the "
                               f"served model ({spec.describe()})", adapter=adapter, path=str(cfg))
        r = positive_int(adapter, cfg, f"{where}.rank", entry.get("rank"))
        scale = finite_number(adapter, cfg, f"{where}.scale", entry.get("scale"))
        in_features, out_features = spec.linears[module]
        a_key, b_key = lora_keys(module)
        why = f"rank {r}; {module} maps {in_features} -> {out_features}"
        a = served_tensor(adapter, file, a_key, _take(adapter, file, tensors, used, a_key), (r, in_features),
                          spec.dtype, why)
        b = served_tensor(adapter, file, b_key, _take(adapter, file, tensors, used, b_key), (out_features, r),
                          spec.dtype, why)
        out[module] = LoraModule(a=a, b=b, scale=scale)
    return LoraParts(out)


def _choice(adapter: str, cfg: Path, option: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise bad_config(adapter, cfg, option, f"must be one of {', '.join(choices)}, not {value!r}")
    return value


def _bottleneck(adapter: str, cfg: Path, file: Path, method: Mapping[str, Any], tensors: dict[str, torch.Tensor],
                used: set[str], spec: ModelSpec) -> BottleneckParts:
    entries = method.get("modules")
    if not isinstance(entries, list) or not entries:
        raise bad_config(adapter, cfg, "methods.bottleneck.modules", f"must be a non-empty list, not {entries!r}")
    d = spec.hidden_size
    modules = []
    for i, entry in enumerate(entries):
        where = f"methods.bottleneck.modules[{i}]"
        if not isinstance(entry, dict) or set(entry) - _BOTTLENECK_KEYS:
            raise bad_config(adapter, cfg, where, f"must be an object with keys among {sorted(_BOTTLENECK_KEYS)}")
        layer = entry.get("layer")
        if not is_int(layer) or not 0 <= layer < spec.num_layers:
            raise AdapterError("unknown_module", f"{cfg.name} {where}.layer is {layer!r}, but the served model has "
                               f"layers 0..{spec.num_layers - 1}", adapter=adapter, path=str(cfg))
        r = positive_int(adapter, cfg, f"{where}.rank", entry.get("rank"))
        biases = {}
        for side in ("down_bias", "up_bias"):
            flag = entry.get(side, True)
            if not isinstance(flag, bool):
                raise bad_config(adapter, cfg, f"{where}.{side}", f"must be true or false, not {flag!r}")
            biases[side] = flag

        def get(tensor: str, shape: tuple[int, ...], i: int = i, r: int = r) -> torch.Tensor:
            key = bottleneck_key(i, tensor)
            return served_tensor(adapter, file, key, _take(adapter, file, tensors, used, key), shape, spec.dtype,
                                 f"rank {r}, hidden {d}")

        modules.append(BottleneckModule(
            layer=layer, site=_choice(adapter, cfg, f"{where}.site", entry.get("site"), BOTTLENECK_SITES),
            input=_choice(adapter, cfg, f"{where}.input", entry.get("input"), BOTTLENECK_INPUTS),
            activation=_choice(adapter, cfg, f"{where}.activation", entry.get("activation"), ACTIVATIONS),
            scale=finite_number(adapter, cfg, f"{where}.scale", entry.get("scale")),
            down=get("down", (r, d)), down_bias=get("down_bias", (r,)) if biases["down_bias"] else None,
            up=get("up", (d, r)), up_bias=get("up_bias", (d,)) if biases["up_bias"] else None))
    return BottleneckParts(modules)


def _prefix(adapter: str, cfg: Path, file: Path, method: Mapping[str, Any], tensors: dict[str, torch.Tensor],
            used: set[str], spec: ModelSpec) -> PrefixParts:
    extra = sorted(set(method) - {"num_virtual_tokens", "positions"})
    if extra:
        raise bad_config(adapter, cfg, f"methods.prefix.{extra[0]}", "is not a key of a native prefix")
    p = positive_int(adapter, cfg, "methods.prefix.num_virtual_tokens", method.get("num_virtual_tokens"))
    positions = _choice(adapter, cfg, "methods.prefix.positions", method.get("positions"), PREFIX_POSITIONS)
    shape = (spec.num_layers, p, spec.num_kv_heads, spec.head_dim)
    why = f"{spec.num_layers} layers, {p} virtual tokens, {spec.num_kv_heads} kv heads of {spec.head_dim}"
    keys, values = (served_tensor(adapter, file, key, _take(adapter, file, tensors, used, key), shape, spec.dtype, why)
                    for key in PREFIX_KEYS)
    return PrefixParts(keys=keys, values=values, positions=positions)
