"""AdapterHub adapters (committed fixtures made with adapters 1.3) read by the store, checked against the logits
AdapterHub itself produced, through a plain reference forward that applies the parts' equations."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from adapters_store import AdapterError, ModelSpec, load_adapter
from adapters_store.types import BottleneckParts, PrefixParts
from tests.fixtures.hub import (
    ADAPTERS,
    HERE,
    HUB,
    NUM_INPUTS,
    copy_adapter,
    edit_hub_tensors,
    expected,
    hub_model,
    prefix_mlp_bound,
)
from tests.fixtures.reference import parts_logits, reference_logits
from tests.tolerance import model_logit_tolerance

POOL = "model.layers.{}.self_attn.prefix_tuning.pool.prefix_tunings.prefix_tuning.self_prefix."
CANONICAL = "model.prefix_tuning.prefix_tunings.prefix_tuning.self_prefix."


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return ModelSpec.from_hf_model(hub_model())


def _max_diff(parts: dict, name: str) -> float:
    return max(float((parts_logits(hub_model(), expected()[f"input_ids.{i}"], parts) - expected()[f"{name}.{i}"])
                     .abs().max()) for i in range(NUM_INPUTS))


def _tolerance(name: str, spec: ModelSpec) -> float:
    return min(model_logit_tolerance(spec, expected()[f"{name}.{i}"]) for i in range(NUM_INPUTS))


def test_fixtures_are_small_and_hold_no_stray_pickle() -> None:
    files = [p for p in HERE.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert sum(p.stat().st_size for p in files) < 2 * 2**20
    pickles = [p for p in files if p.suffix in (".bin", ".pt", ".pkl")]
    assert pickles == [HERE / "refused" / "mam_pickle" / "pytorch_adapter.bin"]


def test_the_reference_forward_is_the_model_s_forward() -> None:
    model = hub_model()
    for i in range(NUM_INPUTS):
        ids = expected()[f"input_ids.{i}"]
        with torch.no_grad():
            hf = model(input_ids=ids[None]).logits[0]
        assert torch.allclose(reference_logits(model, ids), hf, atol=1e-5)
        assert torch.allclose(hf, expected()[f"base.{i}"], atol=1e-5)  # transformers 5 reads the 4.57 save alike


@pytest.mark.parametrize("name", ADAPTERS)
def test_adapter_parts_reproduce_adapterhub_logits(name: str, spec: ModelSpec) -> None:
    weights = load_adapter(name, HUB / name, spec)
    assert weights.format == "adapterhub"
    assert _max_diff(weights.parts, name) < _tolerance(name, spec)
    for i in range(NUM_INPUTS):  # the fixture is not trivially close to the base model
        assert float((expected()[f"{name}.{i}"] - expected()[f"base.{i}"]).abs().max()) > 0.05


def _modules(name: str, spec: ModelSpec) -> list:
    part = load_adapter(name, HUB / name, spec).parts["bottleneck"]
    assert isinstance(part, BottleneckParts)
    return [(m.layer, m.site, m.input, m.activation, m.rank, m.down_bias is not None, m.up_bias is not None)
            for m in part.modules]


def test_option_mapping_of_bottleneck_adapters(spec: ModelSpec) -> None:
    assert _modules("par_bn", spec) == [(i, "ffn", "sublayer_input", "relu", 32, True, True) for i in (0, 1)]
    assert _modules("seq_bn", spec) == [(i, "ffn", "block_output", "relu", 4, True, True) for i in (0, 1)]
    assert _modules("par_bn_attn", spec) == [(i, "attn", "sublayer_input", "gelu", 16, True, True) for i in (0, 1)]
    assert _modules("double_seq_bn", spec) == [(0, site, "sublayer_output", "silu", 4, True, True)
                                               for site in ("attn", "ffn")]  # layer 1 left out
    assert _modules("par_bn_channel", spec) == [(i, "ffn", "sublayer_input", "tanh", 8, True, True) for i in (0, 1)]
    scales = {name: [m.scale for m in load_adapter(name, HUB / name, spec).parts["bottleneck"].modules]
              for name in ("par_bn", "seq_bn", "scaled_par_bn", "par_bn_channel", "mam")}
    assert scales["par_bn"] == scales["mam"] == [4.0, 4.0] and scales["seq_bn"] == [1.0, 1.0]
    assert all(0.5 < s < 2.5 and s not in (1.0, 4.0) for s in scales["scaled_par_bn"])  # the stored ones
    assert scales["par_bn_channel"] == [1.0, 1.0]  # folded into up / up_bias


@pytest.mark.parametrize(("name", "length"), [("prefix_tuning", 5), ("prefix_tuning_flat", 3), ("mam", 4)])
def test_prefix_parts(name: str, length: int, spec: ModelSpec) -> None:
    weights = load_adapter(name, HUB / name, spec)
    prefix = weights.parts["prefix"]
    assert isinstance(prefix, PrefixParts)
    assert prefix.positions == "unshifted" and prefix.num_virtual_tokens == length
    assert prefix.keys.shape == prefix.values.shape == (2, length, 2, 16)
    assert set(weights.methods) == ({"prefix", "bottleneck"} if name == "mam" else {"prefix"})


def test_the_position_convention_matters(spec: ModelSpec) -> None:
    prefix = load_adapter("p", HUB / "prefix_tuning", spec).parts["prefix"]
    shifted = dataclasses.replace(prefix, positions="shifted")
    assert _max_diff({"prefix": shifted}, "prefix_tuning") > 1e-2


def _with_copies(tensors: dict[str, torch.Tensor], keep_canonical: bool) -> None:
    for key in [k for k in tensors if k.startswith(CANONICAL)]:
        for layer in (0, 1):
            tensors[POOL.format(layer) + key[len(CANONICAL):]] = tensors[key].clone()
        if not keep_canonical:
            del tensors[key]


@pytest.mark.parametrize("keep_canonical", [True, False])
def test_per_layer_prefix_copies_are_deduplicated(keep_canonical: bool, tmp_path: Path, spec: ModelSpec) -> None:
    path = copy_adapter("prefix_tuning", tmp_path / "a")
    edit_hub_tensors(path, lambda t: _with_copies(t, keep_canonical))
    got = load_adapter("a", path, spec).parts["prefix"]
    want = load_adapter("b", HUB / "prefix_tuning", spec).parts["prefix"]
    # One prefix MLP evaluated on the same values read from two files: the kernels may sum in other orders (memory
    # alignment picks them), so equal up to the MLP's rounding bound, not bit for bit.
    bound = prefix_mlp_bound(HUB / "prefix_tuning")
    assert (got.keys - want.keys).abs().max() <= bound and (got.values - want.values).abs().max() <= bound


def test_a_differing_prefix_copy_is_refused(tmp_path: Path, spec: ModelSpec) -> None:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        _with_copies(tensors, keep_canonical=True)
        tensors[POOL.format(1) + "wte.weight"] += 1.0

    path = copy_adapter("prefix_tuning", tmp_path / "a")
    edit_hub_tensors(path, edit)
    with pytest.raises(AdapterError, match="must be identical") as info:
        load_adapter("a", path, spec)
    assert info.value.reason == "corrupt_file"


def test_a_model_with_another_layer_count_is_refused(spec: ModelSpec) -> None:
    three = dataclasses.replace(spec, num_layers=3)
    with pytest.raises(AdapterError, match="3 layers") as info:
        load_adapter("p", HUB / "prefix_tuning", three)
    assert info.value.reason == "shape_mismatch"
    with pytest.raises(AdapterError, match="layer 2") as info:
        load_adapter("b", HUB / "par_bn", three)
    assert info.value.reason == "missing_weights"
