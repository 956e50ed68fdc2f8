"""The native format: every part (LoRA, bottleneck adapters, prefix) alone or combined round-trips through
save_native and the reader, and keeps its meaning (checked with the reference forward)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters_store import AdapterError, AdapterWeights, ModelSpec, load_adapter
from adapters_store.native import save_native
from adapters_store.types import BottleneckModule, BottleneckParts, LoraParts
from tests.fixtures.hub import ADAPTERS, HUB, NUM_INPUTS, expected, hub_model
from tests.fixtures.reference import parts_logits
from tests.store_fixtures import make_peft_lora
from tests.tolerance import model_logit_tolerance

pytestmark = [pytest.mark.filterwarnings("ignore:::peft"),
              pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")]


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return ModelSpec.from_hf_model(hub_model())


def _same_parts(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for method in a:
        left, right = dataclasses.asdict(a[method]), dataclasses.asdict(b[method])
        assert _flatten(left).keys() == _flatten(right).keys()
        for key, value in _flatten(left).items():
            other = _flatten(right)[key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, (method, key)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flatten(item, f"{prefix}{key}.").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in _flatten(item, f"{prefix}{i}.").items()}
    return {prefix: value}


@pytest.mark.parametrize("name", ADAPTERS)
def test_adapterhub_adapters_round_trip(name: str, tmp_path: Path, spec: ModelSpec) -> None:
    original = load_adapter(name, HUB / name, spec)
    save_native(original, tmp_path / name, spec, base_model_name="adapterhub-fixture-llama",
                source={"converted_from": "adapterhub"})
    config = json.loads((tmp_path / name / "adapter_config.json").read_text())
    assert config["format"] == "deltaserve" and config["version"] == 1
    loaded = load_adapter(name, tmp_path / name, spec)
    assert loaded.format == "native"
    _same_parts(original.parts, loaded.parts)
    for i in range(NUM_INPUTS):
        got = parts_logits(hub_model(), expected()[f"input_ids.{i}"], loaded.parts)
        assert (got - expected()[f"{name}.{i}"]).abs().max() < 1e-4


def _combined(tmp_path: Path, spec: ModelSpec) -> AdapterWeights:
    """LoRA (made by PEFT) + AdapterHub's MAM prefix and FFN adapter + a multi-head parallel adapter at attention
    + a sequential adapter without biases on the attention output."""
    lora_dir = make_peft_lora(hub_model(), tmp_path / "lora", seed=3, r=4, lora_alpha=8,
                              target_modules=["q_proj", "v_proj", "down_proj"])
    lora = load_adapter("lora", lora_dir, spec).parts["lora"]
    mam = load_adapter("mam", HUB / "mam", spec).parts
    attn = load_adapter("attn", HUB / "par_bn_attn", spec).parts["bottleneck"].modules
    generator = torch.Generator().manual_seed(7)
    houlsby = BottleneckModule(layer=1, site="attn", input="sublayer_output", activation="gelu_new", scale=0.5,
                               down=torch.randn(8, 64, generator=generator) * 0.3, down_bias=None,
                               up=torch.randn(64, 8, generator=generator) * 0.3, up_bias=None)
    modules = sorted([*mam["bottleneck"].modules, *attn, houlsby], key=lambda m: (m.layer, m.site != "attn"))
    return AdapterWeights(name="combo", path="", format="test", parts={
        "lora": lora, "bottleneck": BottleneckParts(modules), "prefix": mam["prefix"]})


def test_a_combination_of_every_method_round_trips(tmp_path: Path, spec: ModelSpec) -> None:
    combo = _combined(tmp_path, spec)
    save_native(combo, tmp_path / "combo", spec)
    loaded = load_adapter("combo", tmp_path / "combo", spec)
    assert set(loaded.methods) == {"lora", "bottleneck", "prefix"}
    _same_parts(combo.parts, loaded.parts)
    ids = expected()["input_ids.2"]
    want = parts_logits(hub_model(), ids, combo.parts)
    # bit-equal parts, but read from a file: other memory alignment may pick other kernels
    assert (parts_logits(hub_model(), ids, loaded.parts) - want).abs().max() < model_logit_tolerance(spec, want)
    for method in combo.parts:  # every method contributes to the output
        without = {k: v for k, v in combo.parts.items() if k != method}
        assert (parts_logits(hub_model(), ids, without) - want).abs().max() > 1e-2, method


def test_without_a_spec_base_model_holds_what_the_parts_show(tmp_path: Path, spec: ModelSpec) -> None:
    save_native(load_adapter("mam", HUB / "mam", spec), tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["base_model"] == {"hidden_size": 64, "num_layers": 2, "num_kv_heads": 2, "head_dim": 16}
    assert load_adapter("a", tmp_path / "a", spec).methods == ("bottleneck", "prefix")


def test_a_shifted_prefix_keeps_its_positions(tmp_path: Path, spec: ModelSpec) -> None:
    prefix = load_adapter("p", HUB / "prefix_tuning", spec).parts["prefix"]
    weights = AdapterWeights("s", "", "test", {"prefix": dataclasses.replace(prefix, positions="shifted")})
    save_native(weights, tmp_path / "s", spec)
    assert load_adapter("s", tmp_path / "s", spec).parts["prefix"].positions == "shifted"


def test_save_native_refuses_parts_it_cannot_express(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ia3"):
        save_native(AdapterWeights("x", "", "test", {"ia3": LoraParts({})}), tmp_path / "x")


def _edit(config: Callable[[dict], None] | None = None,
          tensors: Callable[[dict[str, torch.Tensor]], None] | None = None) -> Callable[[Path, ModelSpec], None]:
    def build(path: Path, spec: ModelSpec) -> None:
        save_native(_combined(path.parent / f"{path.name}_src", spec), path, spec)
        if config is not None:
            data = json.loads((path / "adapter_config.json").read_text())
            config(data)
            (path / "adapter_config.json").write_text(json.dumps(data))
        if tensors is not None:
            found = load_file(str(path / "adapter.safetensors"))
            tensors(found)
            save_file(found, str(path / "adapter.safetensors"))
    return build


def _bn(index: int, **changes: Any) -> Callable[[dict], None]:
    return lambda c: c["methods"]["bottleneck"]["modules"][index].update(changes)


Q0 = "model.layers.0.self_attn.q_proj"
BAD: dict[str, tuple[Callable[[Path, ModelSpec], None], str, list[str]]] = {
    "version": (_edit(lambda c: c.update(version=2)), "unsupported_option", ["version=2", "version 1"]),
    "top_level": (_edit(lambda c: c.update(extras=1)), "unsupported_option", ["extras=1"]),
    "method": (_edit(lambda c: c["methods"].update(ia3={})), "unsupported_option", ["methods.ia3", "known methods"]),
    "no_methods": (_edit(lambda c: c.update(methods={})), "bad_config", ["'methods'", "non-empty"]),
    "layers": (_edit(lambda c: c["base_model"].update(num_layers=3)), "shape_mismatch", ["num_layers=3", "2"]),
    "base_key": (_edit(lambda c: c["base_model"].update(layers=3)), "bad_config", ["'base_model.layers'"]),
    "site": (_edit(_bn(0, site="mlp")), "bad_config", ["modules[0].site", "attn, ffn"]),
    "input": (_edit(_bn(1, input="residual")), "bad_config", ["modules[1].input", "sublayer_input"]),
    "activation": (_edit(_bn(0, activation="mish")), "bad_config", ["modules[0].activation", "gelu_new"]),
    "layer": (_edit(_bn(0, layer=2)), "unknown_module", ["modules[0].layer is 2", "layers 0..1"]),
    "rank": (_edit(_bn(0, rank=8)), "shape_mismatch", ["bottleneck.0.down", "rank 8"]),
    "bias_flag": (_edit(_bn(0, down_bias=False)), "untargeted_module", ["bottleneck.0.down_bias"]),
    "missing_bias": (_edit(_bn(3, up_bias=True)), "missing_weights", ["bottleneck.3.up_bias"]),
    "lora_module": (_edit(lambda c: c["methods"]["lora"]["modules"].update({"model.layers.0.mlp.fc": {
        "rank": 4, "scale": 1.0}})), "unknown_module", ["model.layers.0.mlp.fc"]),
    "lora_rank": (_edit(lambda c: c["methods"]["lora"]["modules"][Q0].update(rank=2)), "shape_mismatch",
                  [f"lora.{Q0}.a", "rank 2"]),
    "positions": (_edit(lambda c: c["methods"]["prefix"].update(positions="rotated")), "bad_config",
                  ["methods.prefix.positions", "shifted, unshifted"]),
    "tokens": (_edit(lambda c: c["methods"]["prefix"].update(num_virtual_tokens=5)), "shape_mismatch",
               ["prefix.keys", "5 virtual tokens"]),
    "missing_tensor": (_edit(tensors=lambda t: t.pop("prefix.values")), "missing_weights", ["'prefix.values'"]),
    "extra_tensor": (_edit(tensors=lambda t: t.update(extra=torch.ones(2))), "untargeted_module", ["'extra'"]),
    "nan": (_edit(tensors=lambda t: t["bottleneck.0.up"].__setitem__((0, 0), float("nan"))), "non_finite",
            ["bottleneck.0.up", "NaN/Inf"]),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_native_adapter_is_refused(name: str, tmp_path: Path, spec: ModelSpec) -> None:
    build, reason, fragments = BAD[name]
    build(tmp_path / name, spec)
    with pytest.raises(AdapterError) as info:
        load_adapter(name, tmp_path / name, spec)
    assert info.value.reason == reason, str(info.value)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
