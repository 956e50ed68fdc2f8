"""AdapterHub (`adapters` 1.3) adapter_config.json: which options we apply, which we refuse, per component.

Semantics read from adapters 1.3 (methods/modeling.py `Adapter` / `ParallelAdapter`, methods/bottleneck.py,
models/llama/modeling_llama.py). On Llama a bottleneck layer is called with the sub-layer output `o`, the
residual stream `h` entering the sub-block and no layer norm, and returns the new residual stream:
- parallel (`is_parallel`): h + o + s * up(act(down(h)))                      -> input "sublayer_input"
- sequential, original_ln_before (seq_bn): y = h + o; y + s * up(act(down(y))) -> input "block_output"
- sequential, not original_ln_before (double_seq_bn, Houlsby): h + o + s * up(act(down(o))) -> "sublayer_output"
where up() includes its bias and s multiplies all of it. `mh_adapter` puts one after attention (site "attn"),
`output_adapter` one after the MLP (site "ffn").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters_store.errors import AdapterError
from adapters_store.formats.common import bad_config, finite_number, is_int, positive_int, unsupported
from adapters_store.spec import ModelSpec

# AdapterHub non_linearity (lowercased, as it looks them up in transformers' ACT2FN) -> our activation name.
ACTIVATION_MAP = {
    "relu": "relu", "gelu": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "swish": "silu",
    "silu": "silu", "tanh": "tanh", "sigmoid": "sigmoid", "linear": "identity",
}
# adapter-transformers configs without a "version" used these names (adapters' ACTIVATION_RENAME).
_LEGACY_ACTIVATIONS = {"gelu": "gelu_new", "gelu_orig": "gelu"}

_BN_APPLIED = frozenset({"mh_adapter", "output_adapter", "reduction_factor", "non_linearity", "is_parallel", "scaling",
                         "original_ln_before", "original_ln_after", "residual_before_ln", "leave_out"})
# Training-time, init-time, or only meaningful with an option refused below (phm_*, adapter_residual_before_ln
# with ln_after) or on encoder-decoder models (cross_adapter); inv_adapter is refused if its weights are present.
_BN_IGNORED = frozenset({
    "architecture", "init_weights", "init_weights_seed", "dropout", "stochastic_depth", "adapter_residual_before_ln",
    "cross_adapter", "inv_adapter", "inv_adapter_reduction_factor", "phm_dim", "factorized_phm_W", "shared_W_phm",
    "shared_phm_rule", "factorized_phm_rule", "phm_c_init", "phm_init_range", "learn_phm",
    "hypercomplex_nonlinearity", "phm_rank", "phm_bias",
})
_BN_REFUSED = {
    "ln_before": "a new LayerNorm before the adapter bottleneck is not applied by this server",
    "ln_after": "a new LayerNorm after the adapter bottleneck is not applied by this server",
    "use_gating": "gated adapters (UniPELT) scale their output by a learned input-dependent gate",
    "phm_layer": "PHM (Compacter) layers store their projections as Kronecker factors",
}
_PREFIX_APPLIED = frozenset({"prefix_length", "flat", "bottleneck_size", "non_linearity", "leave_out", "use_gating"})
_PREFIX_IGNORED = frozenset({"architecture", "encoder_prefix", "cross_prefix", "dropout", "shared_gating",
                             "init_weights_seed"})


@dataclass(frozen=True)
class BottleneckSpec:
    """One bottleneck config: where its modules act, on what input, with which activation and scaling."""

    sites: tuple[str, ...]  # "attn" (mh_adapter) and/or "ffn" (output_adapter)
    input: str
    activation: str
    scaling: float | str  # a number, "learned" (a stored scalar) or "channel" (a stored [d] vector)
    reduction: Mapping[str, float] | float
    leave_out: frozenset[int] = field(default_factory=frozenset)

    def rank(self, layer: int, hidden: int) -> int | None:
        """AdapterHub's down-projection size, int(hidden // reduction_factor) but at least 1; None when a
        per-layer reduction_factor mapping has neither this layer nor a default (AdapterHub raises then)."""
        factor = self.reduction
        if isinstance(factor, Mapping):
            factor = factor.get(str(layer), factor.get("default"))
        return None if factor is None else max(1, int(hidden // factor))


@dataclass(frozen=True)
class PrefixSpec:
    """One prefix-tuning config: P virtual tokens, either flat or an MLP (wte -> Linear -> act -> Linear)."""

    length: int
    flat: bool
    bottleneck_size: int
    activation: str


@dataclass(frozen=True)
class HubConfig:
    """An AdapterHub adapter's components (a plain config has one; a "union" such as MAM several)."""

    name: str
    bottlenecks: tuple[BottleneckSpec, ...]
    prefix: PrefixSpec | None


def parse_config(adapter: str, file: Path, config: Mapping[str, Any], spec: ModelSpec) -> HubConfig:
    """Validates adapter_config.json and turns it into components; AdapterError naming the option at fault."""
    inner = config.get("config")
    if not isinstance(inner, dict):
        raise bad_config(adapter, file, "config", f"must be an object (AdapterHub's adapter config), not {inner!r}")
    hidden = config.get("hidden_size")
    if hidden is not None and hidden != spec.hidden_size:
        raise AdapterError("shape_mismatch", f"{file.name} was made for hidden_size={hidden}, but the served model "
                           f"has {spec.hidden_size} ({spec.describe()})", adapter=adapter, path=str(file))
    name = config.get("name")
    if not isinstance(name, str) or not name or "." in name:
        raise bad_config(adapter, file, "name", f"must be the adapter's name as used in its tensor keys, not {name!r}")
    legacy = "version" not in config
    components = _components(adapter, file, inner)
    bottlenecks, prefixes = [], []
    for index, component in components:
        where = f"config.configs[{index}]" if index is not None else "config"
        arch = component.get("architecture")
        if arch in (None, "bottleneck"):
            bottlenecks.append(_bottleneck(adapter, file, where, component, legacy))
        elif arch == "prefix_tuning":
            prefixes.append(_prefix(adapter, file, where, component, legacy))
        else:
            raise unsupported(adapter, file, f"{where}.architecture", arch, "only bottleneck adapters, prefix tuning "
                              "and their unions (e.g. MAM) are read from AdapterHub adapters")
    sites = [site for b in bottlenecks for site in b.sites]
    if len(set(sites)) != len(sites) or len(prefixes) > 1:
        raise bad_config(adapter, file, "config", "combines two components of the same kind at the same place "
                         "(AdapterHub itself refuses such a union)")
    return HubConfig(name=name, bottlenecks=tuple(bottlenecks), prefix=prefixes[0] if prefixes else None)


def _components(adapter: str, file: Path, inner: Mapping[str, Any]) -> list[tuple[int | None, Mapping[str, Any]]]:
    if inner.get("architecture") != "union":
        return [(None, inner)]
    configs = inner.get("configs")
    if not isinstance(configs, list) or not configs or not all(isinstance(c, dict) for c in configs):
        raise bad_config(adapter, file, "config.configs", f"must be a non-empty list of objects, not {configs!r}")
    for index, component in enumerate(configs):
        if component.get("architecture") == "union":
            raise bad_config(adapter, file, f"config.configs[{index}]", "is a union inside a union")
    return list(enumerate(configs))


def _check_unknown(adapter: str, file: Path, where: str, component: Mapping[str, Any], known: frozenset[str]) -> None:
    for option in sorted(set(component) - known):
        if component[option]:
            raise unsupported(adapter, file, f"{where}.{option}", component[option], "an option this server does "
                              "not know; it cannot tell whether it changes the adapter's output")


def activation(adapter: str, file: Path, option: str, value: Any, legacy: bool) -> str:
    """Our activation name for an AdapterHub non_linearity (None means identity, as in AdapterHub)."""
    if value is None:
        return "identity"
    if not isinstance(value, str):
        raise bad_config(adapter, file, option, f"must be a string, not {value!r}")
    key = value.lower()
    key = _LEGACY_ACTIVATIONS.get(key, key) if legacy else key
    if key not in ACTIVATION_MAP:
        raise unsupported(adapter, file, option, value, f"supported activations: {', '.join(sorted(ACTIVATION_MAP))}")
    return ACTIVATION_MAP[key]


def _bottleneck(adapter: str, file: Path, where: str, c: Mapping[str, Any], legacy: bool) -> BottleneckSpec:
    _check_unknown(adapter, file, where, c, _BN_APPLIED | _BN_IGNORED | frozenset(_BN_REFUSED))
    for option, why in _BN_REFUSED.items():
        if c.get(option):
            raise unsupported(adapter, file, f"{where}.{option}", c[option], why)
    if c.get("original_ln_after", True) is not True:
        raise unsupported(adapter, file, f"{where}.original_ln_after", c["original_ln_after"],
                          "without it the sub-block's residual connection is dropped; only true is supported")
    parallel = _flag(adapter, file, f"{where}.is_parallel", c.get("is_parallel", False))
    ln_before = _flag(adapter, file, f"{where}.original_ln_before", c.get("original_ln_before", False))
    if not parallel and c.get("residual_before_ln", True) is not True:
        raise unsupported(adapter, file, f"{where}.residual_before_ln", c["residual_before_ln"], "a sequential "
                          "adapter whose residual is taken after the add (or 'post_add') is not supported on Llama")
    sites = tuple(site for site, option in (("attn", "mh_adapter"), ("ffn", "output_adapter"))
                  if _flag(adapter, file, f"{where}.{option}", c.get(option, False)))
    if not sites:
        raise bad_config(adapter, file, where, "sets neither mh_adapter nor output_adapter: the adapter acts nowhere")
    scaling = c.get("scaling", 1.0)
    if scaling not in ("learned", "channel"):
        scaling = finite_number(adapter, file, f"{where}.scaling", scaling)
    return BottleneckSpec(
        sites=sites, input="sublayer_input" if parallel else ("block_output" if ln_before else "sublayer_output"),
        activation=activation(adapter, file, f"{where}.non_linearity", c.get("non_linearity"), legacy),
        scaling=scaling, reduction=_reduction(adapter, file, f"{where}.reduction_factor", c.get("reduction_factor")),
        leave_out=_leave_out(adapter, file, f"{where}.leave_out", c.get("leave_out")))


def _prefix(adapter: str, file: Path, where: str, c: Mapping[str, Any], legacy: bool) -> PrefixSpec:
    _check_unknown(adapter, file, where, c, _PREFIX_APPLIED | _PREFIX_IGNORED)
    if c.get("use_gating"):
        raise unsupported(adapter, file, f"{where}.use_gating", c["use_gating"],
                          "gated prefixes (UniPELT) scale keys/values by a learned input-dependent gate")
    if c.get("leave_out"):
        raise unsupported(adapter, file, f"{where}.leave_out", c["leave_out"],
                          "a prefix left out of some layers is not supported (every layer must have one)")
    flat = _flag(adapter, file, f"{where}.flat", c.get("flat", False))
    return PrefixSpec(
        length=positive_int(adapter, file, f"{where}.prefix_length", c.get("prefix_length", 30)), flat=flat,
        bottleneck_size=positive_int(adapter, file, f"{where}.bottleneck_size", c.get("bottleneck_size", 512)),
        activation=activation(adapter, file, f"{where}.non_linearity", c.get("non_linearity", "tanh"), legacy))


def _flag(adapter: str, file: Path, option: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise bad_config(adapter, file, option, f"must be true or false, not {value!r}")
    return value


def _reduction(adapter: str, file: Path, option: str, value: Any) -> Mapping[str, float] | float:
    if isinstance(value, Mapping):
        if "default" not in value and not all(isinstance(k, str) and k.isdigit() for k in value):
            raise bad_config(adapter, file, option, f"maps keys other than layer numbers and 'default': {value!r}")
        factors = {str(k): finite_number(adapter, file, f"{option}[{k!r}]", v) for k, v in value.items()}
        if any(v <= 0 for v in factors.values()):
            raise bad_config(adapter, file, option, f"must be positive, not {value!r}")
        return factors
    factor = finite_number(adapter, file, option, value)
    if factor <= 0:
        raise bad_config(adapter, file, option, f"must be positive, not {value!r}")
    return factor


def _leave_out(adapter: str, file: Path, option: str, value: Any) -> frozenset[int]:
    if value is None:
        return frozenset()
    if not isinstance(value, list) or not all(is_int(v) for v in value):
        raise bad_config(adapter, file, option, f"must be a list of layer numbers, not {value!r}")
    return frozenset(value)
