"""AdapterHub (`adapters` library): adapter_config.json with a "config" object plus adapter.safetensors.

Bottleneck tensors, per layer i and site (attention_adapters = "attn", output_adapters = "ffn"):
  model.layers.{i}.<site>_adapters.adapters.<name>.adapter_down.0.weight [r, d] / .bias [r],
  ...adapter_up.weight [d, r] / .bias [d], and ...scaling ([1] for scaling "learned", [d] for "channel").
Prefix tensors (one prefix for all layers): model.prefix_tuning.prefix_tunings.<name>.self_prefix.
  wte.weight [P, d], control_trans.0.weight [m, d] (+ .bias), control_trans.2.weight [L*2*H_kv*hd, m] (+ .bias),
  or, for flat prefixes, control_trans [P*L*2*H_kv*hd]. AdapterHub registers the same module again under every
  layer's self_attn.prefix_tuning.pool, so a file may repeat those tensors per layer: copies must be identical.
The prefix MLP is evaluated once here: act(wte @ W0.T + b0) @ W2.T + b2, viewed (P, 2L, H_kv, hd); layer l's
keys are slot 2l, values slot 2l+1. AdapterHub joins them after RoPE: real tokens keep positions 0..T-1.
Prediction heads (head_config.json, model_head.safetensors) are never read: the served model's lm_head is used.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from adapters_store.errors import AdapterError
from adapters_store.formats.adapterhub_config import BottleneckSpec, HubConfig, PrefixSpec, parse_config
from adapters_store.formats.common import served_tensor, to_served
from adapters_store.safetensors_io import check_finite, find_weights, read_tensors
from adapters_store.spec import ModelSpec
from adapters_store.types import AdapterWeights, BottleneckModule, BottleneckParts, PrefixParts, activate

WEIGHTS_FILE = "adapter.safetensors"
PICKLE_FILE = "pytorch_adapter.bin"
CONFIG_FILE = "adapter_config.json"
_SITES = {"attention_adapters": "attn", "output_adapters": "ffn"}
_BN_PARAMS = ("adapter_down.0.weight", "adapter_down.0.bias", "adapter_up.weight", "adapter_up.bias", "scaling")
_PREFIX_PARAMS = ("wte.weight", "control_trans.0.weight", "control_trans.0.bias", "control_trans.2.weight",
                  "control_trans.2.bias", "control_trans")
# Bottleneck tensors by (layer, site) and then by parameter name (e.g. "adapter_up.weight").
_Found = dict[tuple[int, str], dict[str, torch.Tensor]]
# Tensor kinds of AdapterHub features we do not apply, and the option that produced them.
_REFUSED_KINDS = (
    ("invertible_adapters", "inv_adapter (invertible adapters on the embeddings)"),
    ("prefix_gates", "use_gating (gated prefix tuning)"),
    (".gate.", "use_gating (gated bottleneck adapters)"),
    ("adapter_fusion", "AdapterFusion layers"),
    (".loras.", "LoRA-type AdapterHub components"),
    ("phm", "phm_layer (Compacter PHM layers)"),
    ("adapter_norm", "ln_before / ln_after (adapter LayerNorms)"),
)


class AdapterHubReader:
    """Reads AdapterHub bottleneck (par_bn, scaled_par_bn, seq_bn, double_seq_bn), prefix_tuning and union (MAM)
    adapters saved with safetensors for a Llama-like model."""

    name = "adapterhub"

    def matches(self, config: Mapping[str, Any]) -> bool:
        return "config" in config and "peft_type" not in config and "format" not in config

    def read(self, name: str, path: str | PathLike[str], config: dict, spec: ModelSpec) -> AdapterWeights:
        directory = Path(path)
        hub = parse_config(name, directory / CONFIG_FILE, config, spec)
        file = _weights_file(name, directory)
        tensors = read_tensors(name, file)
        if not tensors:
            raise AdapterError("missing_weights", f"{file.name} holds no tensors", adapter=name, path=str(file))
        bottleneck, prefix = _classify(name, file, hub.name, tensors, spec)
        parts: dict[str, Any] = {}
        if hub.prefix is not None:
            parts["prefix"] = _prefix_parts(name, file, hub.name, hub.prefix, prefix, spec)
        elif prefix:
            raise AdapterError("untargeted_module", f"{file.name} holds prefix-tuning tensors, but "
                               f"{CONFIG_FILE} has no prefix_tuning component", adapter=name, path=str(file))
        modules = _bottleneck_modules(name, file, hub, bottleneck, spec)
        if modules:
            parts["bottleneck"] = BottleneckParts(modules)
        return AdapterWeights(name=name, path=str(directory), format=self.name, parts=parts, config=dict(config))


def _weights_file(adapter: str, directory: Path) -> Path:
    pickle = directory / PICKLE_FILE
    if not (directory / WEIGHTS_FILE).is_file() and pickle.is_file():
        raise AdapterError(
            "pickle_refused", f"{pickle} is a pickle file; pickles are never loaded (unpickling can run arbitrary "
            f"code). Convert it once, where you trust it, with `deltaserve convert {directory} <new directory>`, "
            f"which loads it with torch.load(weights_only=True) and writes {WEIGHTS_FILE}",
            adapter=adapter, path=str(pickle))
    return find_weights(adapter, directory, WEIGHTS_FILE)


def _patterns(hub_name: str) -> tuple[re.Pattern[str], re.Pattern[str], re.Pattern[str]]:
    name = re.escape(hub_name)
    bn = "|".join(re.escape(p) for p in _BN_PARAMS)
    prefix = "|".join(re.escape(p) for p in _PREFIX_PARAMS)
    return (re.compile(rf"(?:model\.)?layers\.(\d+)\.(attention_adapters|output_adapters)\.adapters\.{name}\.({bn})"),
            re.compile(rf"(?:model\.)?prefix_tuning\.prefix_tunings\.{name}\.self_prefix\.({prefix})"),
            re.compile(rf"(?:model\.)?layers\.(\d+)\.self_attn\.prefix_tuning\.pool\.prefix_tunings\.{name}"
                       rf"\.self_prefix\.({prefix})"))


def _classify(adapter: str, file: Path, hub_name: str, tensors: dict[str, torch.Tensor],
              spec: ModelSpec) -> tuple[_Found, dict[str, torch.Tensor]]:
    """Bottleneck tensors by (layer, site) and param, and the prefix tensors (per-layer copies resolved)."""
    bn_re, prefix_re, copy_re = _patterns(hub_name)
    bottleneck: _Found = {}
    prefix: dict[str, torch.Tensor] = {}
    copies: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for key, tensor in sorted(tensors.items()):
        if match := bn_re.fullmatch(key):
            layer = int(match.group(1))
            if layer >= spec.num_layers:
                raise AdapterError("unknown_module", f"{file.name} holds {key!r} for layer {layer}, but the served "
                                   f"model has {spec.num_layers} layers ({spec.describe()})",
                                   adapter=adapter, path=str(file))
            bottleneck.setdefault((layer, _SITES[match.group(2)]), {})[match.group(3)] = tensor
        elif match := prefix_re.fullmatch(key):
            prefix[match.group(1)] = tensor
        elif match := copy_re.fullmatch(key):
            copies.setdefault(match.group(2), []).append((key, tensor))
        else:
            _refuse_key(adapter, file, hub_name, key)
    for param, found in copies.items():
        reference = prefix.setdefault(param, found[0][1])
        for key, tensor in found:
            if tensor.shape != reference.shape or not torch.equal(tensor, reference):
                raise AdapterError("corrupt_file", f"{file.name}: {key!r} differs from the adapter's prefix tensor "
                                   f"{param!r}; AdapterHub keeps one prefix shared by all layers, so per-layer copies "
                                   "must be identical", adapter=adapter, path=str(file))
    return bottleneck, prefix


def _refuse_key(adapter: str, file: Path, hub_name: str, key: str) -> None:
    for marker, option in _REFUSED_KINDS:
        if marker in key:
            raise AdapterError("unsupported_option", f"{file.name} holds {key!r}: {option} is not supported",
                               adapter=adapter, path=str(file))
    raise AdapterError("unsupported_option", f"{file.name} holds {key!r}, which is not a bottleneck or prefix "
                       f"tensor of adapter {hub_name!r} on a Llama-like model", adapter=adapter, path=str(file))


def _bottleneck_modules(adapter: str, file: Path, hub: HubConfig, found: _Found,
                        spec: ModelSpec) -> list[BottleneckModule]:
    by_place = {(layer, site): b for b in hub.bottlenecks for site in b.sites
                for layer in range(spec.num_layers) if layer not in b.leave_out}
    for (layer, site), params in sorted(found.items()):
        if (layer, site) not in by_place:
            raise AdapterError("untargeted_module", f"{file.name} holds {sorted(params)} for layer {layer} at the "
                               f"{site} site, which {CONFIG_FILE} does not configure (mh_adapter / output_adapter / "
                               "leave_out)", adapter=adapter, path=str(file))
    order = {"attn": 0, "ffn": 1}
    return [_module(adapter, file, hub.name, layer, site, b, found.get((layer, site), {}), spec)
            for (layer, site), b in sorted(by_place.items(), key=lambda item: (item[0][0], order[item[0][1]]))]


def _module(adapter: str, file: Path, hub_name: str, layer: int, site: str, b: BottleneckSpec,
            params: dict[str, torch.Tensor], spec: ModelSpec) -> BottleneckModule:
    d = spec.hidden_size
    r = b.rank(layer, d)
    if r is None:
        raise AdapterError("bad_config", f"{CONFIG_FILE} reduction_factor {b.reduction!r} gives no value for layer "
                           f"{layer} (and no 'default')", adapter=adapter, path=str(file))
    prefix = f"model.layers.{layer}.{'attention' if site == 'attn' else 'output'}_adapters.adapters.{hub_name}"
    needed = ["adapter_down.0.weight", "adapter_down.0.bias", "adapter_up.weight", "adapter_up.bias"]
    needed += ["scaling"] if isinstance(b.scaling, str) else []
    missing = [p for p in needed if p not in params]
    if missing:
        raise AdapterError("missing_weights", f"{file.name} lacks {', '.join(missing)} of the {site} adapter at layer "
                           f"{layer} ({prefix}.*)", adapter=adapter, path=str(file))
    if "scaling" in params and not isinstance(b.scaling, str):
        raise AdapterError("untargeted_module", f"{file.name} holds a stored scaling for layer {layer} ({site}), but "
                           f"{CONFIG_FILE} sets scaling={b.scaling!r}", adapter=adapter, path=str(file))
    why = f"r = hidden {d} // reduction_factor"

    def get(param: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return served_tensor(adapter, file, f"{prefix}.{param}", params[param], shape, dtype, why)

    down, down_bias = get("adapter_down.0.weight", (r, d), spec.dtype), get("adapter_down.0.bias", (r,), spec.dtype)
    up = get("adapter_up.weight", (d, r), torch.float32)
    up_bias = get("adapter_up.bias", (d,), torch.float32)
    scale = b.scaling
    if scale == "learned":
        scale = float(get("scaling", (1,), torch.float32).item())
    elif scale == "channel":
        # s * (W x + b) == (diag(s) W) x + s * b: a per-channel scaling folds exactly into the up-projection.
        channel = get("scaling", (d,), torch.float32)
        up, up_bias, scale = channel[:, None] * up, channel * up_bias, 1.0
    return BottleneckModule(
        layer=layer, site=site, input=b.input, activation=b.activation, scale=float(scale),
        down=down, down_bias=down_bias, up=to_served(adapter, file, f"{prefix}.adapter_up.weight", up, spec.dtype),
        up_bias=to_served(adapter, file, f"{prefix}.adapter_up.bias", up_bias, spec.dtype))


def _prefix_parts(adapter: str, file: Path, hub_name: str, p: PrefixSpec, found: dict[str, torch.Tensor],
                  spec: ModelSpec) -> PrefixParts:
    layers, heads, head_dim, d = spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.hidden_size
    width = layers * 2 * heads * head_dim
    why = f"{layers} layers * 2 * {heads} kv heads * head dim {head_dim}"
    needed = ("control_trans",) if p.flat else _PREFIX_PARAMS[:-1]
    missing = [k for k in needed if k not in found]
    extra = sorted(set(found) - set(needed))
    if missing or extra:
        raise AdapterError("missing_weights" if missing else "untargeted_module",
                           f"{file.name}: a {'flat ' if p.flat else ''}prefix needs {', '.join(needed)}; "
                           f"{'missing ' + ', '.join(missing) if missing else 'unexpected ' + ', '.join(extra)}",
                           adapter=adapter, path=str(file))

    def get(param: str, shape: tuple[int, ...], reason: str = why) -> torch.Tensor:
        key = f"model.prefix_tuning.prefix_tunings.{hub_name}.self_prefix.{param}"
        return served_tensor(adapter, file, key, found[param], shape, torch.float32, reason)

    if p.flat:
        flat = get("control_trans", (p.length * width,), f"prefix_length {p.length} * {why}")
    else:
        mid = p.bottleneck_size
        wte = get("wte.weight", (p.length, d), f"prefix_length {p.length}, hidden {d}")
        hidden = F.linear(wte, get("control_trans.0.weight", (mid, d), f"bottleneck_size {mid}"),
                          get("control_trans.0.bias", (mid,), f"bottleneck_size {mid}"))
        flat = F.linear(activate(p.activation, hidden), get("control_trans.2.weight", (width, mid)),
                        get("control_trans.2.bias", (width,)))
        check_finite(adapter, file, "prefix keys/values", flat, after=" after evaluating the prefix MLP")
    slots = flat.reshape(p.length, 2 * layers, heads, head_dim)
    keys = slots[:, 0::2].permute(1, 0, 2, 3)  # [L, P, H_kv, hd]
    values = slots[:, 1::2].permute(1, 0, 2, 3)
    return PrefixParts(keys=to_served(adapter, file, "prefix keys", keys, spec.dtype),
                       values=to_served(adapter, file, "prefix values", values, spec.dtype), positions="unshifted")
