"""`deltaserve convert`: a pickled adapter becomes a safetensors adapter that the store serves unchanged."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapters_store import ModelSpec, load_adapter
from adapters_store.convert import PREFIX_POOL, ConvertError, convert_adapter, dedup_prefix_copies
from server.cli import main as cli
from tests.fixtures.hub import HUB, NUM_INPUTS, REFUSED, expected, hub_model, prefix_mlp_bound
from tests.fixtures.reference import parts_logits
from tests.store_fixtures import make_peft_lora, tiny_llama
from tests.tolerance import model_logit_tolerance

pytestmark = [pytest.mark.filterwarnings("ignore:::peft"),
              pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")]
SRC = REFUSED / "mam_pickle"


def test_convert_resolves_prefix_copies_and_serves_like_adapterhub(tmp_path: Path) -> None:
    done = convert_adapter(SRC, tmp_path / "mam")
    assert done.weights_file == "adapter.safetensors" and done.dropped_copies == 2 * 5  # 2 layers x 5 tensors
    keys = load_file(str(tmp_path / "mam" / "adapter.safetensors"))
    assert not any(PREFIX_POOL in k for k in keys) and len(keys) == done.tensors == 5 + 2 * 4
    spec = ModelSpec.from_hf_model(hub_model())
    converted = load_adapter("mam", tmp_path / "mam", spec)
    committed = load_adapter("mam", HUB / "mam", spec)
    diff = (converted.parts["prefix"].keys - committed.parts["prefix"].keys).abs().max()
    assert diff <= prefix_mlp_bound(HUB / "mam")  # the same MLP on the same values from another file
    for i in range(NUM_INPUTS):
        got = parts_logits(hub_model(), expected()[f"input_ids.{i}"], converted.parts)
        want = expected()[f"mam.{i}"]
        assert (got - want).abs().max() < model_logit_tolerance(spec, want)


def test_the_cli_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["convert", str(SRC), str(tmp_path / "out")]) == 0
    assert "10 duplicated prefix copies dropped" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    assert cli(["convert", str(SRC), str(tmp_path / "out")]) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err
    assert cli(["convert", str(HUB / "par_bn"), str(tmp_path / "x")]) == 2
    assert "nothing to convert" in capsys.readouterr().err


def test_a_peft_pickle_converts_too(tmp_path: Path) -> None:
    base = tiny_llama()
    src = make_peft_lora(base, tmp_path / "src", seed=0, r=4, lora_alpha=8, target_modules=["q_proj"])
    torch.save(load_file(str(src / "adapter_model.safetensors")), src / "adapter_model.bin")
    (src / "adapter_model.safetensors").unlink()
    assert convert_adapter(src, tmp_path / "dst").weights_file == "adapter_model.safetensors"
    assert load_adapter("l", tmp_path / "dst", ModelSpec.from_hf_model(base)).methods == ("lora",)


def test_inconsistent_copies_and_non_tensor_pickles_are_refused(tmp_path: Path) -> None:
    canonical = "model.prefix_tuning.prefix_tunings.p.self_prefix.wte.weight"
    copy = f"model.layers.1.{PREFIX_POOL}p.self_prefix.wte.weight"
    with pytest.raises(ConvertError, match="must be identical"):
        dedup_prefix_copies({canonical: torch.zeros(2), copy: torch.ones(2)})
    kept, dropped = dedup_prefix_copies({copy: torch.ones(2)})
    assert list(kept) == [canonical] and dropped == 1
    shutil.copytree(SRC, tmp_path / "src")
    torch.save({"a": [1, 2]}, tmp_path / "src" / "pytorch_adapter.bin")
    with pytest.raises(ConvertError, match="dict of named tensors"):
        convert_adapter(tmp_path / "src", tmp_path / "dst")
