"""PEFT LoRA adapters made with peft itself, read by the store, checked against PeftModel's forward."""

from __future__ import annotations

import dataclasses
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from adapters_store import AdapterNotFound, AdapterStore, ModelSpec, load_adapter
from adapters_store.formats import detect, register_format, registered_formats, unregister_format
from adapters_store.types import AdapterWeights, LoraModule, LoraParts
from tests.store_fixtures import (
    ALL_LINEARS,
    edit_tensors,
    lora_hooks,
    lora_key,
    make_peft_lora,
    peft_reference,
    random_ids,
    tiny_llama,
)

# Building adapters with peft warns about things the tests do on purpose (third-party noise).
pytestmark = [pytest.mark.filterwarnings("ignore:::peft"),
              pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")]

# name -> (decoder layers, LoraConfig kwargs)
CASES: dict[str, tuple[int, dict[str, Any]]] = {
    "qv_r4": (2, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "all_r8_rslora": (2, dict(r=8, lora_alpha=16, use_rslora=True, target_modules=ALL_LINEARS)),
    "all_r16_alpha7": (2, dict(r=16, lora_alpha=7, target_modules=ALL_LINEARS)),
    "regex": (2, dict(r=2, lora_alpha=3, target_modules=r".*\.(k_proj|down_proj)")),
    "regex_one_layer": (2, dict(r=4, lora_alpha=4, target_modules=r"model\.layers\.1\.self_attn\.(q|o)_proj")),
    "layers_pattern": (4, dict(r=4, lora_alpha=4, target_modules=ALL_LINEARS, layers_to_transform=[1, 3],
                               layers_pattern="layers")),
    "layers_int": (4, dict(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], layers_to_transform=2)),
    "patterns": (2, dict(r=4, lora_alpha=8, target_modules=ALL_LINEARS,
                         rank_pattern={"q_proj": 2, "model.layers.1.mlp.up_proj": 6},
                         alpha_pattern={"v_proj": 32, r"layers\.0\.mlp\.down_proj": 3})),
    "patterns_rslora": (2, dict(r=4, lora_alpha=8, use_rslora=True, target_modules=ALL_LINEARS,
                                rank_pattern={"k_proj": 8}, alpha_pattern={"o_proj": 2})),
    "exclude": (2, dict(r=4, lora_alpha=8, target_modules=ALL_LINEARS,
                        exclude_modules=["model.layers.0.mlp.gate_proj", "o_proj"])),
    "all_linear": (2, dict(r=4, lora_alpha=8, target_modules="all-linear")),
}


@pytest.fixture(scope="module")
def bases() -> dict[int, torch.nn.Module]:
    return {layers: tiny_llama(seed=0, layers=layers) for layers in (2, 4)}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory, bases: dict[int, torch.nn.Module]) -> dict[int, Path]:
    """One adapters directory per base model, holding every case for it."""
    dirs = {layers: tmp_path_factory.mktemp(f"zoo{layers}") for layers in bases}
    for seed, (name, (layers, kwargs)) in enumerate(CASES.items()):
        make_peft_lora(bases[layers], dirs[layers] / name, seed=seed, **kwargs)
    return dirs


@pytest.fixture(scope="module")
def stores(bases: dict[int, torch.nn.Module], zoo: dict[int, Path]) -> dict[int, AdapterStore]:
    stores = {layers: AdapterStore(ModelSpec.from_hf_model(bases[layers]), zoo[layers]) for layers in bases}
    for store in stores.values():
        store.scan()
    return stores


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_peft(name: str, bases: dict, zoo: dict, stores: dict) -> None:
    layers, _ = CASES[name]
    base, store = bases[layers], stores[layers]
    assert store.rejected == {}
    weights = store.get(name)
    reference = peft_reference(base, zoo[layers] / name)
    ids = random_ids(seed=1)
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        plain = base(input_ids=ids).logits
        with lora_hooks(base, weights.parts["lora"]):
            got = base(input_ids=ids).logits
    assert (expected - plain).abs().max() > 1e-2, "the adapter should change the logits"
    assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("name", list(CASES))
def test_modules_ranks_and_scales_match_peft(name: str, bases: dict, zoo: dict, stores: dict) -> None:
    from peft.tuners.lora import LoraLayer

    layers, _ = CASES[name]
    weights = stores[layers].get(name)
    lora: LoraParts = weights.parts["lora"]
    reference = peft_reference(bases[layers], zoo[layers] / name)
    peft_layers = {path.removeprefix("base_model.model."): layer for path, layer in reference.named_modules()
                   if isinstance(layer, LoraLayer)}
    assert set(lora.modules) == set(peft_layers)
    for path, layer in peft_layers.items():
        assert lora.modules[path].rank == layer.r["default"], path
        assert lora.modules[path].scale == pytest.approx(layer.scaling["default"], rel=1e-12), path
    peft_params = sum(p.numel() for n, p in reference.named_parameters() if "lora_" in n)
    assert weights.num_parameters == peft_params
    assert weights.nbytes == 4 * peft_params


def test_rank_and_alpha_patterns_are_applied(stores: dict) -> None:
    lora = stores[2].get("patterns").parts["lora"]
    assert lora.ranks["model.layers.0.self_attn.q_proj"] == 2
    assert lora.ranks["model.layers.1.mlp.up_proj"] == 6
    assert lora.ranks["model.layers.0.mlp.up_proj"] == 4
    assert lora.modules["model.layers.0.self_attn.v_proj"].scale == 32 / 4
    assert lora.modules["model.layers.0.mlp.down_proj"].scale == 3 / 4
    assert lora.modules["model.layers.1.mlp.down_proj"].scale == 8 / 4
    assert lora.max_rank == 6
    rs = stores[2].get("patterns_rslora").parts["lora"]
    assert rs.modules["model.layers.0.self_attn.k_proj"].scale == pytest.approx(8 / 8 ** 0.5)
    assert rs.modules["model.layers.0.self_attn.o_proj"].scale == pytest.approx(2 / 4 ** 0.5)


def test_loaded_weights_shape_dtype_and_layout(stores: dict, zoo: dict) -> None:
    weights = stores[2].get("qv_r4")
    assert isinstance(weights, AdapterWeights)
    assert (weights.name, weights.format, weights.methods) == ("qv_r4", "peft_lora", ("lora",))
    assert Path(weights.path) == zoo[2] / "qv_r4"
    assert weights.config["peft_type"] == "LORA" and weights.config["r"] == 4
    modules = weights.parts["lora"].modules
    assert sorted(modules) == [f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qv"]
    v = modules["model.layers.0.self_attn.v_proj"]
    assert isinstance(v, LoraModule)
    assert v.a.shape == (4, 64) and v.b.shape == (32, 4)  # GQA: v out = 2 kv heads * 16
    for module in modules.values():
        for t in (module.a, module.b):
            assert t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu"


def test_tensors_take_the_served_dtype(bases: dict, zoo: dict) -> None:
    spec = dataclasses.replace(ModelSpec.from_hf_model(bases[2]), dtype=torch.bfloat16)
    weights = load_adapter("qv", zoo[2] / "qv_r4", spec)
    fp32 = load_adapter("qv", zoo[2] / "qv_r4", ModelSpec.from_hf_model(bases[2]))
    for path, module in weights.parts["lora"].modules.items():
        assert module.a.dtype == module.b.dtype == torch.bfloat16
        torch.testing.assert_close(module.b.float(), fp32.parts["lora"].modules[path].b, rtol=1e-2, atol=1e-2)
    assert weights.nbytes * 2 == fp32.nbytes


def test_half_precision_file_is_upcast(tmp_path: Path, bases: dict) -> None:
    path = make_peft_lora(bases[2], tmp_path / "half", seed=3, r=4, lora_alpha=8, target_modules=["q_proj"])
    edit_tensors(path, lambda t: t.update({k: v.half() for k, v in t.items()}))
    weights = load_adapter("half", path, ModelSpec.from_hf_model(bases[2]))
    module = weights.parts["lora"].modules["model.layers.0.self_attn.q_proj"]
    assert module.a.dtype == torch.float32


def test_a_pickle_next_to_the_safetensors_file_is_never_opened(tmp_path: Path, bases: dict) -> None:
    path = make_peft_lora(bases[2], tmp_path / "both", seed=3, r=4, lora_alpha=8, target_modules=["q_proj"])
    (path / "adapter_model.bin").write_bytes(b"not even a pickle")
    assert load_adapter("both", path, ModelSpec.from_hf_model(bases[2])).num_parameters == 2 * 4 * (64 + 64)


def test_the_weights_file_decides_which_targeted_modules_are_present(tmp_path: Path, bases: dict) -> None:
    path = make_peft_lora(bases[2], tmp_path / "partial", seed=4, r=4, lora_alpha=8, target_modules=ALL_LINEARS)

    def drop_layer_1(tensors: dict) -> None:
        for key in [k for k in tensors if ".layers.1." in k]:
            del tensors[key]

    edit_tensors(path, drop_layer_1)
    lora = load_adapter("partial", path, ModelSpec.from_hf_model(bases[2])).parts["lora"]
    assert sorted(lora.modules) == sorted(f"model.layers.0.{p}" for p in
                                          ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                           "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"])
    assert lora_key("model.layers.0.mlp.up_proj", "A") == "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"


def test_model_spec_from_hf_model(bases: dict) -> None:
    spec = ModelSpec.from_hf_model(bases[4])
    assert (spec.model_type, spec.num_layers, spec.hidden_size) == ("llama", 4, 64)
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim) == (4, 2, 16)
    assert (spec.intermediate_size, spec.vocab_size, spec.dtype) == (128, 256, torch.float32)
    assert len(spec.linears) == 4 * 7 and "lm_head" not in spec.linears
    assert spec.linears["model.layers.3.self_attn.k_proj"] == (64, 32)
    assert spec.linears["model.layers.0.mlp.down_proj"] == (128, 64)
    assert spec.layer_of("model.layers.3.mlp.up_proj") == 3 and spec.layer_of("lm_head") is None
    assert ModelSpec.from_hf_model(tiny_llama(layers=2, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert spec == ModelSpec.from_hf_model(tiny_llama(seed=5, layers=4))


def test_store_api(tmp_path: Path, bases: dict, zoo: dict) -> None:
    spec = ModelSpec.from_hf_model(bases[2])
    store = AdapterStore(spec, None)
    assert store.scan() == [] and store.names() == [] and len(store) == 0
    weights = store.load("mine", zoo[2] / "regex")
    assert store.get("mine") is weights and "mine" in store and store.names() == ["mine"]
    assert store.adapters == {"mine": weights}
    with pytest.raises(KeyError):
        store.get("other")
    with pytest.raises(AdapterNotFound, match="'other' not found: served adapters: mine"):
        store.get("other")
    assert store.remove("mine") is weights and store.names() == []
    with pytest.raises(AdapterNotFound):
        store.remove("mine")


def test_scan_skips_hidden_dirs_and_files_and_rescans(tmp_path: Path, bases: dict) -> None:
    make_peft_lora(bases[2], tmp_path / "a", seed=0, r=2, lora_alpha=2, target_modules=["q_proj"])
    make_peft_lora(bases[2], tmp_path / ".hidden", seed=0, r=2, lora_alpha=2, target_modules=["q_proj"])
    (tmp_path / "README.md").write_text("not an adapter")
    store = AdapterStore(ModelSpec.from_hf_model(bases[2]), str(tmp_path))
    assert store.scan() == ["a"] and store.rejected == {}
    first = store.get("a")
    make_peft_lora(bases[2], tmp_path / "a", seed=1, r=4, lora_alpha=2, target_modules=["v_proj"])
    assert store.scan() == ["a"]
    assert store.get("a") is not first and store.get("a").parts["lora"].max_rank == 4


def test_scan_of_a_missing_directory_fails_loudly(tmp_path: Path, bases: dict) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        AdapterStore(ModelSpec.from_hf_model(bases[2]), tmp_path / "nowhere").scan()


def test_concurrent_loads(bases: dict, zoo: dict) -> None:
    store = AdapterStore(ModelSpec.from_hf_model(bases[2]))
    names = [name for name, (layers, _) in CASES.items() if layers == 2]
    threads = [threading.Thread(target=store.load, args=(f"{name}-{i}", zoo[2] / name))
               for i in range(2) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.names() == sorted(f"{name}-{i}" for i in range(2) for name in names)


class ToyReader:
    """A format that holds nothing, to check that the store goes through the registry."""

    name = "toy"

    def matches(self, config: dict) -> bool:
        return config.get("toy") is True

    def read(self, name: str, path: Any, config: dict, spec: ModelSpec) -> AdapterWeights:
        return AdapterWeights(name, str(path), self.name, {"lora": LoraParts({})}, config)


class BrokenReader(ToyReader):
    name = "broken"

    def matches(self, config: dict) -> bool:
        return config.get("broken") is True

    def read(self, name: str, path: Any, config: dict, spec: ModelSpec) -> AdapterWeights:
        raise RuntimeError("a bug in a reader")


def test_an_unexpected_error_rejects_only_that_adapter(tmp_path: Path, bases: dict, zoo: dict) -> None:
    shutil.copytree(zoo[2] / "qv_r4", tmp_path / "good")
    (tmp_path / "bug").mkdir()
    (tmp_path / "bug" / "adapter_config.json").write_text('{"broken": true}')
    register_format(BrokenReader())
    try:
        store = AdapterStore(ModelSpec.from_hf_model(bases[2]), tmp_path)
        assert store.scan() == ["good"]
    finally:
        unregister_format("broken")
    error = store.rejected["bug"]
    assert error.reason == "load_failed" and "RuntimeError: a bug in a reader" in str(error)


def test_format_registry(tmp_path: Path, bases: dict) -> None:
    assert "peft_lora" in registered_formats()
    assert detect({"peft_type": "LORA"}, tmp_path).name == "peft_lora"
    with pytest.raises(ValueError, match="already registered"):
        register_format(detect({"peft_type": "LORA"}, tmp_path))
    with pytest.raises(TypeError):
        register_format(object())  # type: ignore[arg-type]
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "adapter_config.json").write_text('{"toy": true}')
    register_format(ToyReader())
    try:
        store = AdapterStore(ModelSpec.from_hf_model(bases[2]), tmp_path)
        assert store.scan() == ["t"]
        assert store.get("t").format == "toy" and store.get("t").num_parameters == 0
    finally:
        unregister_format("toy")
    assert "toy" not in registered_formats()
