"""PEFT LoRA adapter_config.json: which options we apply, which we refuse, and per-module rank/alpha/scale."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from adapters_store.errors import AdapterError
from adapters_store.formats.peft_matching import Targeting, pattern_key

# Options that do not change what LoRA computes at inference (metadata, training-time or init-time only).
_IGNORED = frozenset({
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "lora_dropout", "runtime_config", "megatron_core", "qalora_group_size",
    "ensure_weight_tying", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    # fan_in_fan_out only transposes the *base* weight (Conv1D models); lora_A/B are stored the same way.
    "fan_in_fan_out",
    # VeLoRA only swaps the backward pass of lora_A; its forward is plain LoRA.
    "velora_config",
    "merge_weights",  # very old PEFT: merging at eval time, same output
})
_APPLIED = frozenset({
    "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules", "exclude_modules",
    "layers_to_transform", "layers_pattern", "init_lora_weights", "bias", "modules_to_save",
})


def _truthy(value: Any) -> bool:
    return bool(value)


def _set(value: Any) -> bool:
    return value is not None


# option -> (is it set to a non-default value?, why we cannot apply it)
_UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "use_dora": (_truthy, "DoRA (weight-decomposed LoRA) rescales the merged weight by a magnitude vector"),
    "lora_bias": (_truthy, "a bias on lora_B is not applied by this server"),
    "use_qalora": (_truthy, "QA-LoRA pools the input of quantised (GPTQ) layers"),
    "target_parameters": (_truthy, "LoRA on raw nn.Parameters (e.g. MoE experts) is not supported"),
    "layer_replication": (_truthy, "layer replication builds a different layer stack than the served model"),
    "trainable_token_indices": (_truthy, "trainable token embeddings are not applied by this server"),
    "alora_invocation_tokens": (_truthy, "activated LoRA applies only after its invocation tokens"),
    "megatron_config": (_set, "Megatron tensor-parallel LoRA layers are not supported"),
    "use_bdlora": (_set, "block-diagonal LoRA stores its factors in another layout"),
    "arrow_config": (_set, "Arrow routing mixes several adapters per token"),
    "kasa_config": (_set, "KaSA truncates the base weights and adds a singular-value diagonal"),
    "monteclora_config": (_set, "MonteCLoRA samples its factors"),
    "enable_lora": (_set, "old PEFT merged-qkv LoRA (enable_lora) is not supported"),
}
# init_lora_weights values that change the base model's weights, so the adapter is wrong on the original model.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _refuse(adapter: str, option: str, message: str) -> AdapterError:
    return AdapterError("unsupported_option", f"adapter_config.json sets {option}: {message}", adapter=adapter)


def _bad(adapter: str, option: str, message: str) -> AdapterError:
    return AdapterError("bad_config", f"adapter_config.json option {option!r} {message}", adapter=adapter)


def check_options(adapter: str, config: Mapping[str, Any]) -> None:
    """Refuses every option set to a value we cannot apply faithfully, naming the option."""
    for option, (is_set, why) in _UNSUPPORTED.items():
        if option in config and is_set(config[option]):
            raise _refuse(adapter, f"{option}={config[option]!r}", why)
    if config.get("modules_to_save"):
        raise _refuse(adapter, f"modules_to_save={config['modules_to_save']!r}",
                      "full copies of modules (e.g. a new lm_head) are not applied by this server")
    if config.get("bias", "none") != "none":
        raise _refuse(adapter, f"bias={config['bias']!r}", "trained base-layer biases are not applied; "
                      "only bias='none' is supported")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise _refuse(adapter, f"init_lora_weights={init!r}", "this initialisation changes the base model's "
                      "weights; save it with path_initial_model_for_weight_conversion to get a plain LoRA")
    for option in sorted(set(config) - _IGNORED - _APPLIED - set(_UNSUPPORTED)):
        if config[option]:
            raise _refuse(adapter, f"{option}={config[option]!r}", "an option this server does not know; "
                          "it cannot tell whether it changes the adapter's output")


@dataclass(frozen=True)
class LoraSettings:
    """The parts of a PEFT LoRA config that decide which modules are adapted and how strongly."""

    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: Mapping[str, int]
    alpha_pattern: Mapping[str, float]
    targeting: Targeting

    def rank(self, module: str) -> int:
        key = pattern_key(self.rank_pattern, module)
        return self.r if key is None else self.rank_pattern[key]

    def alpha(self, module: str) -> float:
        key = pattern_key(self.alpha_pattern, module)
        return self.lora_alpha if key is None else self.alpha_pattern[key]

    def scale(self, module: str) -> float:
        r = self.rank(module)
        return self.alpha(module) / (math.sqrt(r) if self.use_rslora else r)

    def rank_source(self, module: str) -> str:
        """Where a module's rank comes from, for error messages."""
        key = pattern_key(self.rank_pattern, module)
        return f"rank_pattern[{key!r}]" if key is not None else "r"


def parse_settings(adapter: str, config: Mapping[str, Any]) -> LoraSettings:
    """Validates types and regexes of the applied options (bad_config on any mistake)."""
    r = _positive_int(adapter, "r", config.get("r", 8))
    alpha = _number(adapter, "lora_alpha", config.get("lora_alpha", 8))
    rank_pattern = _mapping(adapter, "rank_pattern", config.get("rank_pattern"))
    alpha_pattern = _mapping(adapter, "alpha_pattern", config.get("alpha_pattern"))
    for key, value in rank_pattern.items():
        _positive_int(adapter, f"rank_pattern[{key!r}]", value)
    for key, value in alpha_pattern.items():
        _number(adapter, f"alpha_pattern[{key!r}]", value)
    targeting = _targeting(adapter, config)
    for option, patterns in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        for key in patterns:
            _compiles(adapter, f"{option}[{key!r}]", rf"(.*\.)?({key})$")
    use_rslora = config.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise _bad(adapter, "use_rslora", f"must be true or false, not {use_rslora!r}")
    return LoraSettings(r=r, lora_alpha=alpha, use_rslora=use_rslora,
                        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, targeting=targeting)


def _targeting(adapter: str, config: Mapping[str, Any]) -> Targeting:
    target = config.get("target_modules")
    if target is None:
        raise _bad(adapter, "target_modules", "is not set (PEFT would guess per-architecture defaults); set it")
    target = _names(adapter, "target_modules", target)
    exclude = _names(adapter, "exclude_modules", config.get("exclude_modules"))
    layers = config.get("layers_to_transform")
    pattern = config.get("layers_pattern")
    if isinstance(target, str) and (layers is not None or pattern is not None):
        raise _bad(adapter, "layers_to_transform", "cannot be used when target_modules is a regex string")
    if pattern and layers is None:
        raise _bad(adapter, "layers_pattern", "needs layers_to_transform")
    if layers is not None and not (_is_int(layers) or (isinstance(layers, list) and all(map(_is_int, layers)))):
        raise _bad(adapter, "layers_to_transform", f"must be an int or a list of ints, not {layers!r}")
    pattern = _names(adapter, "layers_pattern", pattern)
    for option, value in (("target_modules", target), ("exclude_modules", exclude)):
        if isinstance(value, str):
            _compiles(adapter, option, value)
    for layers_pattern in [pattern] if isinstance(pattern, str) else pattern or []:
        _compiles(adapter, "layers_pattern", layers_pattern)
    return Targeting(target, exclude, layers, pattern)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(adapter: str, option: str, value: Any) -> int:
    if not _is_int(value) or value <= 0:
        raise _bad(adapter, option, f"must be a positive integer, not {value!r}")
    return value


def _number(adapter: str, option: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(adapter, option, f"must be a finite number, not {value!r}")
    return value


def _mapping(adapter: str, option: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise _bad(adapter, option, f"must be an object of module-name patterns, not {value!r}")
    return dict(value)


def _names(adapter: str, option: str, value: Any) -> str | list[str] | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise _bad(adapter, option, f"must be a string (regex) or a list of module names, not {value!r}")


def _compiles(adapter: str, option: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise _bad(adapter, option, f"is not a valid regular expression ({exc}): {pattern!r}") from exc
