"""Our port of PEFT's module matching agrees with PEFT's own functions on every linear of a Llama."""

from __future__ import annotations

from typing import Any

import pytest

from adapters_store.formats.peft_matching import Targeting, pattern_key

LAYERS = 12
MODULES = [f"model.layers.{i}.{p}" for i in range(LAYERS) for p in
           ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]

TARGETINGS: list[dict[str, Any]] = [
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules=["self_attn.q_proj", "mlp.down_proj", "proj"]),
    dict(target_modules=["model.layers.3.self_attn.q_proj", "k_proj"], layers_to_transform=[1]),
    dict(target_modules=r".*\.(k_proj|down_proj)"),
    dict(target_modules=r"model\.layers\.1\d?\.mlp\..*"),
    dict(target_modules="q_proj"),
    dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[1, 10], layers_pattern="layers"),
    dict(target_modules=["o_proj"], layers_to_transform=2),
    dict(target_modules=["o_proj", "gate_proj"], layers_to_transform=[0, 11], layers_pattern=["blocks", "layers"]),
    dict(target_modules=["o_proj"], layers_to_transform=[0], layers_pattern="h"),
    dict(target_modules=["q_proj", "k_proj", "v_proj"], exclude_modules=["model.layers.0.self_attn.k_proj", "v_proj"]),
    dict(target_modules=r".*_proj", exclude_modules=r".*\.1\d\..*"),
]


@pytest.mark.parametrize("kwargs", TARGETINGS, ids=[str(i) for i in range(len(TARGETINGS))])
def test_targeting_agrees_with_peft(kwargs: dict[str, Any]) -> None:
    from peft import LoraConfig
    from peft.tuners.tuners_utils import _ExcludedModule, check_target_module_exists

    config = LoraConfig(**kwargs)
    ours = Targeting(kwargs["target_modules"], kwargs.get("exclude_modules"), kwargs.get("layers_to_transform"),
                     kwargs.get("layers_pattern"))
    for module in MODULES:
        theirs = check_target_module_exists(config, module)
        expected = bool(theirs) and not isinstance(theirs, _ExcludedModule)
        assert ours.targets(module) == expected, module


@pytest.mark.parametrize("patterns", [
    ["q_proj"], ["self_attn.q_proj", "proj"], [r"layers\.1\.mlp\.up_proj", "up_proj"], ["layers.1.*"],
    [r"model\.layers\.(0|3)\.self_attn\.(q|k)_proj"], ["_proj"], ["layers.11.self_attn.o_proj"],
])
def test_pattern_key_agrees_with_peft(patterns: list[str]) -> None:
    from peft.utils.other import get_pattern_key

    for module in MODULES:
        theirs = get_pattern_key(patterns, module)
        assert (pattern_key(patterns, module) or module) == theirs, module
