"""Bad adapters are refused with a reason and a message naming what is at fault; good ones still serve."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from adapters_store import AdapterError, AdapterNotFound, AdapterStore, ModelSpec, load_adapter
from adapters_store.formats import PeftLoraReader
from tests.store_fixtures import ALL_LINEARS, edit_config, edit_tensors, lora_key, make_peft_lora, tiny_llama

# Building adapters with peft warns about things the tests do on purpose (third-party noise).
pytestmark = [pytest.mark.filterwarnings("ignore:::peft"),
              pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")]

Q0 = "model.layers.0.self_attn.q_proj"
QV = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def _good(base: torch.nn.Module, path: Path, **kwargs: object) -> Path:
    return make_peft_lora(base, path, seed=0, **(kwargs or QV))


def _weights_file(path: Path) -> Path:
    return path / "adapter_model.safetensors"


def missing_weights(base, path):
    _weights_file(_good(base, path)).unlink()


def truncated(base, path):
    file = _weights_file(_good(base, path))
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def garbage(base, path):
    _weights_file(_good(base, path)).write_bytes(b"PK\x03\x04 this is a zip, not safetensors" * 10)


def wrong_in_features(base, path):
    edit_tensors(_good(base, path), lambda t: t.update({lora_key(Q0, "A"): torch.ones(4, 63)}))


def wrong_rank(base, path):
    edit_config(_good(base, path, r=8, lora_alpha=8, target_modules=["q_proj"]), r=4)


def layer_99(base, path):
    edit_tensors(_good(base, path), lambda t: t.update({lora_key("model.layers.99.self_attn.q_proj", "A"):
                                                        torch.ones(4, 64),
                                                        lora_key("model.layers.99.self_attn.q_proj", "B"):
                                                        torch.ones(64, 4)}))


def no_such_linear(base, path):
    module = "model.layers.0.self_attn.qkv_proj"
    edit_tensors(_good(base, path), lambda t: t.update({lora_key(module, "A"): torch.ones(4, 64),
                                                        lora_key(module, "B"): torch.ones(64, 4)}))


def untargeted(base, path):
    module = "model.layers.0.self_attn.k_proj"
    edit_tensors(_good(base, path), lambda t: t.update({lora_key(module, "A"): torch.ones(4, 64),
                                                        lora_key(module, "B"): torch.ones(32, 4)}))


def outside_layers(base, path):
    _good(base, path, r=4, lora_alpha=8, target_modules=["q_proj"])
    edit_config(path, layers_to_transform=[0])


def nan(base, path):
    edit_tensors(_good(base, path), lambda t: t[lora_key(Q0, "B")].__setitem__((3, 1), float("nan")))


def inf(base, path):
    edit_tensors(_good(base, path), lambda t: t[lora_key(Q0, "A")].__setitem__((0, 0), float("-inf")))


def pickle_only(base, path):
    _good(base, path)
    from safetensors.torch import load_file

    torch.save(load_file(str(_weights_file(path))), path / "adapter_model.bin")
    _weights_file(path).unlink()


def not_json(base, path):
    (_good(base, path) / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8,')


def no_config(base, path):
    (_good(base, path) / "adapter_config.json").unlink()


def config_is_a_list(base, path):
    (_good(base, path) / "adapter_config.json").write_text("[1, 2]")


def other_peft_type(base, path):
    edit_config(_good(base, path), peft_type="IA3")


def adapterhub(base, path):
    path.mkdir()
    (path / "adapter_config.json").write_text('{"config": {"architecture": "union"}, "model_name": "x"}')


def dora(base, path):
    _good(base, path, r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)


def magnitude_tensor(base, path):
    edit_tensors(_good(base, path), lambda t: t.update(
        {f"base_model.model.{Q0}.lora_magnitude_vector": torch.ones(64)}))


def modules_to_save(base, path):
    _good(base, path, r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])


def lm_head_tensor(base, path):
    edit_tensors(_good(base, path), lambda t: t.update({"base_model.model.lm_head.weight": torch.ones(256, 64)}))


def bias_lora_only(base, path):
    _good(base, path, r=4, lora_alpha=8, target_modules=["q_proj"], bias="lora_only")


def lora_bias(base, path):
    _good(base, path, r=4, lora_alpha=8, target_modules=["q_proj"], lora_bias=True)


def embedding_lora(base, path):
    _good(base, path, r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])


def a_without_b(base, path):
    edit_tensors(_good(base, path), lambda t: t.pop(lora_key(Q0, "B")))


def empty_file(base, path):
    save_file({}, str(_weights_file(_good(base, path))))


def zero_rank(base, path):
    edit_config(_good(base, path), r=0)


def bad_regex(base, path):
    edit_config(_good(base, path), target_modules="(q_proj")


def no_targets(base, path):
    edit_config(_good(base, path), target_modules=None)


def int_tensor(base, path):
    edit_tensors(_good(base, path), lambda t: t.update({lora_key(Q0, "A"): torch.ones(4, 64, dtype=torch.int32)}))


def qalora(base, path):
    edit_config(_good(base, path), use_qalora=True)


def layer_replication(base, path):
    edit_config(_good(base, path), layer_replication=[[0, 2], [1, 2]])


def pissa(base, path):
    edit_config(_good(base, path), init_lora_weights="pissa_niter_4")


def unknown_option(base, path):
    edit_config(_good(base, path), lora_fancy_mode="on")


def rslora_string(base, path):
    edit_config(_good(base, path), use_rslora="false")


def foreign_key(base, path):
    edit_tensors(_good(base, path), lambda t: t.update({f"{Q0}.lora_A.default.weight": t.pop(lora_key(Q0, "A"))}))


# directory name -> (builder, reason, fragments the message must contain)
BAD: dict[str, tuple[Callable[[torch.nn.Module, Path], None], str, list[str]]] = {
    "missing_weights": (missing_weights, "missing_weights", ["no adapter_model.safetensors", "adapter_config.json"]),
    "truncated": (truncated, "corrupt_file", ["adapter_model.safetensors", "truncated"]),
    "garbage": (garbage, "corrupt_file", ["adapter_model.safetensors", "not a readable safetensors file"]),
    "wrong_in_features": (wrong_in_features, "shape_mismatch", [f"{Q0}.lora_A.weight", "[4, 63]", "[4, 64]"]),
    "wrong_rank": (wrong_rank, "shape_mismatch", [f"{Q0}.lora_A.weight", "[8, 64]", "rank 4 from r"]),
    "layer_99": (layer_99, "unknown_module", ["model.layers.99.self_attn.q_proj", "2 layers"]),
    "no_such_linear": (no_such_linear, "unknown_module", ["model.layers.0.self_attn.qkv_proj"]),
    "untargeted": (untargeted, "untargeted_module", ["model.layers.0.self_attn.k_proj", "target_modules="]),
    "outside_layers": (outside_layers, "untargeted_module", ["model.layers.1.self_attn.q_proj",
                                                             "layers_to_transform=[0]"]),
    "nan": (nan, "non_finite", [lora_key(Q0, "B"), "NaN/Inf", "adapter_model.safetensors"]),
    "inf": (inf, "non_finite", [lora_key(Q0, "A"), "NaN/Inf"]),
    "pickle_only": (pickle_only, "pickle_refused", ["adapter_model.bin", "never loaded", "weights_only=True",
                                                    "adapter_model.safetensors"]),
    "not_json": (not_json, "bad_config", ["adapter_config.json", "not valid JSON"]),
    "no_config": (no_config, "bad_config", ["no adapter_config.json", "adapter_model.safetensors"]),
    "config_is_a_list": (config_is_a_list, "bad_config", ["adapter_config.json", "JSON list"]),
    "other_peft_type": (other_peft_type, "unknown_format", ["peft_type 'IA3'", "peft_lora"]),
    "adapterhub": (adapterhub, "bad_config", ["adapter_config.json", "'name'"]),  # read by the adapterhub reader
    "dora": (dora, "unsupported_option", ["use_dora=True", "DoRA"]),
    "magnitude_tensor": (magnitude_tensor, "unsupported_option", ["lora_magnitude_vector", "use_dora"]),
    "modules_to_save": (modules_to_save, "unsupported_option", ["modules_to_save=['lm_head']"]),
    "lm_head_tensor": (lm_head_tensor, "unsupported_option", ["base_model.model.lm_head.weight", "not a LoRA"]),
    "bias_lora_only": (bias_lora_only, "unsupported_option", ["bias='lora_only'"]),
    "lora_bias": (lora_bias, "unsupported_option", ["lora_bias=True"]),
    "embedding_lora": (embedding_lora, "unsupported_option", ["lora_embedding_A", "embedding LoRA"]),
    "a_without_b": (a_without_b, "missing_weights", ["lora_A but no lora_B", Q0]),
    "empty_file": (empty_file, "missing_weights", ["no tensors"]),
    "zero_rank": (zero_rank, "bad_config", ["'r'", "positive integer"]),
    "bad_regex": (bad_regex, "bad_config", ["'target_modules'", "regular expression"]),
    "no_targets": (no_targets, "bad_config", ["'target_modules'", "not set"]),
    "int_tensor": (int_tensor, "bad_dtype", [f"{Q0}.lora_A.weight", "torch.int32"]),
    "qalora": (qalora, "unsupported_option", ["use_qalora=True"]),
    "layer_replication": (layer_replication, "unsupported_option", ["layer_replication="]),
    "pissa": (pissa, "unsupported_option", ["init_lora_weights='pissa_niter_4'", "base model's weights"]),
    "unknown_option": (unknown_option, "unsupported_option", ["lora_fancy_mode='on'", "does not know"]),
    "rslora_string": (rslora_string, "bad_config", ["'use_rslora'", "true or false"]),
    "foreign_key": (foreign_key, "unsupported_option", [f"{Q0}.lora_A.default.weight", "not a LoRA weight"]),
}
GOOD = ["good_all", "good_qv"]


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    return tiny_llama(seed=0, layers=2)


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory: pytest.TempPathFactory, base: torch.nn.Module) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    make_peft_lora(base, root / "good_all", seed=1, r=8, lora_alpha=16, target_modules=ALL_LINEARS)
    make_peft_lora(base, root / "good_qv", seed=2, **QV)
    for name, (build, _, _) in BAD.items():
        build(base, root / name)
    return root


@pytest.fixture(scope="module")
def store(adapters_dir: Path, base: torch.nn.Module) -> AdapterStore:
    store = AdapterStore(ModelSpec.from_hf_model(base), adapters_dir)
    assert store.scan() == GOOD
    return store


def test_good_adapters_are_served_next_to_bad_ones(store: AdapterStore) -> None:
    assert store.names() == GOOD
    assert sorted(store.rejected) == sorted(BAD)
    assert len(store.get("good_all").parts["lora"].modules) == 2 * 7


@pytest.mark.parametrize("name", list(BAD))
def test_bad_adapter_is_refused_with_reason_and_message(name: str, store: AdapterStore) -> None:
    _, reason, fragments = BAD[name]
    error = store.rejected[name]
    assert isinstance(error, AdapterError)
    message = str(error)
    assert error.reason == reason, message
    assert error.adapter == name and message.startswith(f"adapter {name!r}: ")
    for fragment in fragments:
        assert fragment in message
    with pytest.raises(AdapterNotFound, match="rejected"):
        store.get(name)


def test_rejections_are_logged(adapters_dir: Path, base: torch.nn.Module, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="deltaserve.store"):
        AdapterStore(ModelSpec.from_hf_model(base), adapters_dir).scan()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == len(BAD)
    assert any("'dora'" in w and "use_dora" in w for w in warnings)
    assert any("loaded adapter 'good_qv'" in r.getMessage() for r in caplog.records)


def test_failed_load_keeps_the_served_version(adapters_dir: Path, store: AdapterStore) -> None:
    served = store.load("x", adapters_dir / "good_qv")
    with pytest.raises(AdapterError) as info:
        store.load("x", adapters_dir / "nan")
    assert info.value.reason == "non_finite" and info.value.adapter == "x"
    assert store.get("x") is served
    store.remove("x")


def test_a_rescan_moves_a_broken_adapter_to_rejected(tmp_path: Path, base: torch.nn.Module) -> None:
    path = make_peft_lora(base, tmp_path / "a", seed=0, **QV)
    store = AdapterStore(ModelSpec.from_hf_model(base), tmp_path)
    assert store.scan() == ["a"]
    nan(base, tmp_path / "b")
    shutil.rmtree(path)
    shutil.copytree(tmp_path / "b", path)
    assert store.scan() == [] and store.names() == []
    assert sorted(store.rejected) == ["a", "b"]
    store.remove("b")
    assert sorted(store.rejected) == ["a"]


def test_overflow_in_the_served_dtype_is_refused(tmp_path: Path, base: torch.nn.Module) -> None:
    path = _good(base, tmp_path / "big")
    edit_tensors(path, lambda t: t[lora_key(Q0, "B")].__setitem__((0, 0), 1e6))
    spec = dataclasses.replace(ModelSpec.from_hf_model(base), dtype=torch.float16)
    with pytest.raises(AdapterError, match="after conversion from torch.float32 to torch.float16") as info:
        load_adapter("big", path, spec)
    assert info.value.reason == "non_finite"
    with pytest.raises(AdapterError, match="beyond 65504") as info:   # served in fp32: beyond any trained range
        load_adapter("big", path, ModelSpec.from_hf_model(base))
    assert info.value.reason == "out_of_range"


def test_the_lora_reader_refuses_other_peft_types(tmp_path: Path, base: torch.nn.Module) -> None:
    with pytest.raises(AdapterError, match="peft_type='PREFIX_TUNING'") as info:
        PeftLoraReader().read("p", tmp_path, {"peft_type": "PREFIX_TUNING"}, ModelSpec.from_hf_model(base))
    assert info.value.reason == "unsupported_option"


def test_errors_are_well_formed() -> None:
    with pytest.raises(ValueError, match="unknown AdapterError reason"):
        AdapterError("oops", "message")
    error = AdapterError("bad_config", "r is wrong", adapter="a", path="/x")
    assert (error.reason, error.path, str(error)) == ("bad_config", "/x", "adapter 'a': r is wrong [bad_config]")
    assert str(AdapterNotFound("b")) == "adapter 'b' not found"
    assert isinstance(AdapterNotFound("b"), KeyError)
    with pytest.raises(AdapterError) as info:
        load_adapter("nowhere", "/nonexistent/adapter", None)  # type: ignore[arg-type]
    assert info.value.reason == "missing_weights"
