"""PEFT prefix-tuning adapters made with peft itself, read by the store, checked against PEFT's get_prompt and
forward (teacher-forced logits through a plain reference forward with the "shifted" position convention)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters_store import AdapterError, AdapterStore, ModelSpec, load_adapter
from adapters_store.types import PrefixParts
from tests.fixtures.reference import reference_logits
from tests.store_fixtures import edit_config, edit_tensors, random_ids, tiny_llama

pytestmark = [pytest.mark.filterwarnings("ignore:::peft"),
              pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning"),
              pytest.mark.filterwarnings("ignore:.*past_key_values. is deprecated:FutureWarning")]

CASES = [(tokens, projection) for tokens in (1, 10, 30) for projection in (False, True)]


def _case_name(tokens: int, projection: bool) -> str:
    return f"p{tokens}{'_proj' if projection else ''}"


def make_peft_prefix(model: torch.nn.Module, out_dir: Path, seed: int, tokens: int,
                     projection: bool) -> torch.nn.Module:
    """Saves a real PEFT prefix adapter with random weights in `out_dir`; returns the PeftModel (not in
    inference mode, so with prefix_projection its get_prompt runs the MLP)."""
    from peft import PrefixTuningConfig, get_peft_model

    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=tokens, prefix_projection=projection,
                                encoder_hidden_size=24)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in peft_model.prompt_encoder.named_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * (0.3 if param.dim() > 1 else 0.1))
    peft_model.save_pretrained(str(out_dir))
    return peft_model.eval()


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    return tiny_llama(seed=0, layers=2)


@pytest.fixture(scope="module")
def spec(base: torch.nn.Module) -> ModelSpec:
    return ModelSpec.from_hf_model(base)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory, base: torch.nn.Module) -> dict[str, tuple[Path, torch.nn.Module]]:
    root = tmp_path_factory.mktemp("peft_prefix")
    return {_case_name(t, p): (root / _case_name(t, p), make_peft_prefix(base, root / _case_name(t, p), i, t, p))
            for i, (t, p) in enumerate(CASES)}


@pytest.mark.parametrize(("tokens", "projection"), CASES)
def test_prefix_parts_equal_peft_get_prompt(tokens: int, projection: bool, made: dict, spec: ModelSpec) -> None:
    path, peft_model = made[_case_name(tokens, projection)]
    weights = load_adapter("a", path, spec)
    assert weights.format == "peft_prefix" and weights.methods == ("prefix",)
    prefix = weights.parts["prefix"]
    assert isinstance(prefix, PrefixParts)
    assert prefix.positions == "shifted" and prefix.num_virtual_tokens == tokens
    assert prefix.keys.shape == (2, tokens, 2, 16)
    with torch.no_grad():
        cache = peft_model.get_prompt(batch_size=1)
    for layer in range(2):
        # PEFT's cache holds [batch, kv heads, P, head dim]
        assert torch.allclose(prefix.keys[layer], cache.layers[layer].keys[0].transpose(0, 1), atol=1e-6)
        assert torch.allclose(prefix.values[layer], cache.layers[layer].values[0].transpose(0, 1), atol=1e-6)


@pytest.mark.parametrize(("tokens", "projection"), CASES)
def test_shifted_prefix_reproduces_peft_forward(tokens: int, projection: bool, made: dict, base: torch.nn.Module,
                                                spec: ModelSpec) -> None:
    path, peft_model = made[_case_name(tokens, projection)]
    prefix = load_adapter("a", path, spec).parts["prefix"]
    ids = random_ids(seed=tokens, batch=1, length=11)[0]
    with torch.no_grad():
        want = peft_model(input_ids=ids[None]).logits[0]
        plain = base(input_ids=ids[None]).logits[0]
    assert (want - plain).abs().max() > 1e-2  # the prefix matters
    assert torch.allclose(reference_logits(base, ids, prefix=prefix), want, atol=1e-4)


def test_prefix_adapters_are_served_by_the_store(made: dict, spec: ModelSpec) -> None:
    store = AdapterStore(spec, next(iter(made.values()))[0].parent)
    assert sorted(store.scan()) == sorted(made)
    assert all(w.format == "peft_prefix" for w in store.adapters.values())


def _good(base: torch.nn.Module, path: Path) -> Path:
    make_peft_prefix(base, path, seed=0, tokens=3, projection=False)
    return path


def _pickle_only(base: torch.nn.Module, path: Path) -> None:
    file = _good(base, path) / "adapter_model.safetensors"
    torch.save(load_file(str(file)), path / "adapter_model.bin")
    file.unlink()


def _tensor(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[torch.nn.Module, Path], None]:
    return lambda base, path: edit_tensors(_good(base, path), edit)


def _config(**changes: object) -> Callable[[torch.nn.Module, Path], None]:
    return lambda base, path: edit_config(_good(base, path), **changes)


def _empty(base: torch.nn.Module, path: Path) -> None:
    save_file({}, str(_good(base, path) / "adapter_model.safetensors"))


# name -> (builder, reason, fragments the message must contain)
BAD: dict[str, tuple[Callable[[torch.nn.Module, Path], None], str, list[str]]] = {
    "layers": (_config(num_layers=3), "shape_mismatch", ["num_layers=3", "2 layers"]),
    "heads": (_config(num_attention_heads=4, token_dim=64), "shape_mismatch", ["num_attention_heads=4", "2 heads"]),
    "short": (_tensor(lambda t: t.update(prompt_embeddings=t["prompt_embeddings"][:, :64])), "shape_mismatch",
              ["'prompt_embeddings'", "[3, 64]", "[3, 128]"]),
    "tokens": (_config(num_virtual_tokens=4), "shape_mismatch", ["[3, 128]", "[4, 128]"]),
    "zero_tokens": (_config(num_virtual_tokens=0), "bad_config", ["'num_virtual_tokens'", "positive integer"]),
    "extra": (_tensor(lambda t: t.update({"prompt_encoder.transform.0.weight": torch.ones(2, 2)})),
              "unsupported_option", ["prompt_encoder.transform.0.weight"]),
    "empty": (_empty, "missing_weights", ["'prompt_embeddings'"]),
    "nan": (_tensor(lambda t: t["prompt_embeddings"].__setitem__((0, 5), float("nan"))), "non_finite",
            ["prompt_embeddings", "NaN/Inf"]),
    "int": (_tensor(lambda t: t.update(prompt_embeddings=t["prompt_embeddings"].to(torch.int32))), "bad_dtype",
            ["torch.int32"]),
    "pickle": (_pickle_only, "pickle_refused", ["adapter_model.bin", "never loaded"]),
    "seq2seq": (_config(num_transformer_submodules=2), "unsupported_option", ["num_transformer_submodules=2"]),
    "modules_to_save": (_config(modules_to_save=["score"]), "unsupported_option", ["modules_to_save=['score']"]),
    "unknown": (_config(prefix_magic=True), "unsupported_option", ["prefix_magic=True", "does not know"]),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_peft_prefix_is_refused(name: str, tmp_path: Path, base: torch.nn.Module, spec: ModelSpec) -> None:
    build, reason, fragments = BAD[name]
    build(base, tmp_path / name)
    with pytest.raises(AdapterError) as info:
        load_adapter(name, tmp_path / name, spec)
    assert info.value.reason == reason, str(info.value)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
