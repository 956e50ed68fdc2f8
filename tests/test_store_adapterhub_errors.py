"""AdapterHub adapters the store cannot apply faithfully are refused, with the reason and the option or tensor."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from adapters_store import AdapterError, AdapterStore, ModelSpec, load_adapter
from tests.fixtures.hub import REFUSED, copy_adapter, edit_hub_config, edit_hub_tensors, hub_model

BN = "model.layers.{}.output_adapters.adapters.par_bn."


def _option(adapter: str, **changes: Any) -> Callable[[Path], None]:
    """Copies `adapter` and sets options in its config (in the union's last component for MAM)."""
    def build(path: Path) -> None:
        copy_adapter(adapter, path)

        def edit(config: dict[str, Any]) -> None:
            inner = config["config"]
            target = inner["configs"][-1] if inner.get("architecture") == "union" else inner
            target.update(changes)
        edit_hub_config(path, edit)
    return build


def _top(adapter: str, **changes: Any) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        copy_adapter(adapter, path)
        edit_hub_config(path, lambda config: config.update(changes))
    return build


def _tensors(adapter: str, edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        copy_adapter(adapter, path)
        edit_hub_tensors(path, edit)
    return build


def _pickle(path: Path) -> None:
    import shutil

    shutil.copytree(REFUSED / "mam_pickle", path)


def _union_with_lora(path: Path) -> None:
    copy_adapter("mam", path)
    edit_hub_config(path, lambda c: c["config"]["configs"].append({"architecture": "lora", "r": 8}))


# name -> (builder, reason, fragments the message must contain)
BAD: dict[str, tuple[Callable[[Path], None], str, list[str]]] = {
    "pickle": (_pickle, "pickle_refused", ["pytorch_adapter.bin", "never loaded", "deltaserve convert",
                                          "weights_only=True"]),
    "ln_before": (_option("par_bn", ln_before=True), "unsupported_option", ["config.ln_before=True", "LayerNorm"]),
    "ln_after": (_option("seq_bn", ln_after=True), "unsupported_option", ["config.ln_after=True"]),
    "gating": (_option("par_bn", use_gating=True), "unsupported_option", ["config.use_gating=True", "gate"]),
    "phm": (_option("seq_bn", phm_layer=True), "unsupported_option", ["config.phm_layer=True", "PHM"]),
    "no_ln_after": (_option("par_bn", original_ln_after=False), "unsupported_option",
                    ["config.original_ln_after=False", "residual"]),
    "residual_after_add": (_option("seq_bn", residual_before_ln=False), "unsupported_option",
                           ["config.residual_before_ln=False"]),
    "post_add": (_option("seq_bn", residual_before_ln="post_add"), "unsupported_option",
                 ["config.residual_before_ln='post_add'"]),
    "leakyrelu": (_option("par_bn", non_linearity="leakyrelu"), "unsupported_option",
                  ["config.non_linearity='leakyrelu'", "supported activations"]),
    "unknown_option": (_option("par_bn", fancy_mode="on"), "unsupported_option",
                       ["config.fancy_mode='on'", "does not know"]),
    "prefix_leave_out": (_option("prefix_tuning", leave_out=[1]), "unsupported_option", ["config.leave_out=[1]"]),
    "prefix_gating": (_option("mam", use_gating=True), "unsupported_option", ["config.configs[1].use_gating=True"]),
    "lora_component": (_union_with_lora, "unsupported_option", ["config.configs[2].architecture='lora'"]),
    "string_config": (_top("par_bn", config="pfeiffer"), "bad_config", ["'config'", "must be an object"]),
    "no_name": (_top("par_bn", name=None), "bad_config", ["'name'"]),
    "other_hidden_size": (_top("par_bn", hidden_size=128), "shape_mismatch", ["hidden_size=128", "64"]),
    "reduction_factor": (_option("par_bn", reduction_factor=4), "shape_mismatch",
                         ["adapter_down.0.weight", "[32, 64]", "[16, 64]", "reduction_factor"]),
    "reduction_mapping": (_option("par_bn", reduction_factor={"0": 2}), "bad_config", ["layer 1", "default"]),
    "scaling_word": (_option("par_bn", scaling="huge"), "bad_config", ["config.scaling", "finite number"]),
    "learned_without_tensor": (_option("par_bn", scaling="learned"), "missing_weights", ["scaling", "layer 0"]),
    "stored_scaling_not_configured": (_option("scaled_par_bn", scaling=2.0), "untargeted_module",
                                      ["stored scaling", "scaling=2.0"]),
    "left_out_layer_has_weights": (_option("par_bn", leave_out=[1]), "untargeted_module", ["layer 1", "leave_out"]),
    "attn_weights_not_configured": (_option("par_bn_attn", mh_adapter=False, output_adapter=True),
                                    "untargeted_module", ["attn site"]),
    "nowhere": (_option("par_bn", output_adapter=False), "bad_config", ["neither mh_adapter nor output_adapter"]),
    "prefix_size": (_option("prefix_tuning", bottleneck_size=16), "shape_mismatch",
                    ["control_trans.0.weight", "[32, 64]", "bottleneck_size 16"]),
    "prefix_length": (_option("prefix_tuning_flat", prefix_length=4), "shape_mismatch", ["control_trans", "[384]"]),
    "prefix_not_configured": (_top("mam", config={"mh_adapter": False, "output_adapter": True, "reduction_factor": 2,
                                                  "non_linearity": "relu", "is_parallel": True, "scaling": 4.0}),
                              "untargeted_module", ["prefix-tuning tensors"]),
    "nan": (_tensors("par_bn", lambda t: t[BN.format(0) + "adapter_up.weight"].__setitem__((1, 2), float("nan"))),
            "non_finite", [BN.format(0) + "adapter_up.weight", "NaN/Inf"]),
    "int_tensor": (_tensors("par_bn", lambda t: t.update({BN.format(0) + "adapter_up.bias":
                                                          torch.ones(64, dtype=torch.int64)})),
                   "bad_dtype", ["adapter_up.bias", "torch.int64"]),
    "missing_bias": (_tensors("par_bn", lambda t: t.pop(BN.format(1) + "adapter_up.bias")), "missing_weights",
                     ["adapter_up.bias", "layer 1"]),
    "layer_5": (_tensors("par_bn", lambda t: t.update({BN.format(5) + "adapter_up.bias": torch.ones(64)})),
                "unknown_module", ["layer 5", "2 layers"]),
    "invertible": (_tensors("par_bn", lambda t: t.update({"model.invertible_adapters.par_bn.F.0.weight":
                                                          torch.ones(2, 2)})),
                   "unsupported_option", ["invertible_adapters", "inv_adapter"]),
    "foreign_tensor": (_tensors("par_bn", lambda t: t.update({"model.layers.0.mlp.up_proj.weight":
                                                              torch.ones(128, 64)})),
                       "unsupported_option", ["model.layers.0.mlp.up_proj.weight", "not a bottleneck or prefix"]),
    "other_name": (_top("par_bn", name="renamed"), "unsupported_option", ["adapters.par_bn", "'renamed'"]),
    "empty": (_tensors("par_bn", lambda t: t.clear()), "missing_weights", ["no tensors"]),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> AdapterStore:
    root = tmp_path_factory.mktemp("hub_bad")
    copy_adapter("mam", root / "good_mam")
    for name, (build, _, _) in BAD.items():
        build(root / name)
    store = AdapterStore(ModelSpec.from_hf_model(hub_model()), root)
    assert store.scan() == ["good_mam"]
    return store


@pytest.mark.parametrize("name", list(BAD))
def test_bad_adapterhub_adapter_is_refused(name: str, store: AdapterStore) -> None:
    _, reason, fragments = BAD[name]
    error = store.rejected[name]
    message = str(error)
    assert error.reason == reason, message
    for fragment in fragments:
        assert fragment in message, message


def test_a_pickle_is_refused_even_with_a_stray_head_file(tmp_path: Path) -> None:
    _pickle(tmp_path / "p")
    (tmp_path / "p" / "head_config.json").write_text("{}")
    with pytest.raises(AdapterError, match="deltaserve convert") as info:
        load_adapter("p", tmp_path / "p", ModelSpec.from_hf_model(hub_model()))
    assert info.value.reason == "pickle_refused"
