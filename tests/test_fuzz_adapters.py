"""Fuzzing the adapter readers with hypothesis (bounded: a few seconds each): the safetensors reader and every
adapter format (PEFT LoRA, PEFT prefix, AdapterHub bottleneck/prefix/MAM, native) fed random headers, shapes,
dtypes, offsets and configs either read the adapter or refuse it with an AdapterError of a known reason: never
another exception, never the catch-all `load_failed`."""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from adapters_store import AdapterError, ModelSpec, load_adapter
from adapters_store.native import save_native
from adapters_store.safetensors_io import read_tensors
from tests.fixtures.hub import HUB, hub_model
from tests.fuzz_strategies import FUZZ, config_mutations, json_values, tensors
from tests.store_fixtures import make_peft_lora, tiny_llama
from tests.test_store_prefix import make_peft_prefix

SAFETENSORS_DTYPES = ("F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "Q4", "", "f32")


def _refused_cleanly(error: AdapterError) -> None:
    assert error.reason != "load_failed", error
    assert len(str(error)) < 4096


@st.composite
def safetensors_files(draw: st.DrawFn) -> bytes:
    """A header of random entries (dtype, shape, data_offsets), a declared length that may lie, random data."""
    entries = {}
    for name in draw(st.lists(st.text(max_size=8), max_size=4, unique=True)):
        entries[name] = {"dtype": draw(st.sampled_from(SAFETENSORS_DTYPES)),
                         "shape": draw(st.lists(st.integers(-2, 2**33), max_size=3)),
                         "data_offsets": draw(st.lists(st.integers(-8, 2**33), min_size=0, max_size=3))}
    if draw(st.booleans()):
        entries["__metadata__"] = draw(json_values)
    header = json.dumps(entries).encode() if draw(st.booleans()) else draw(st.binary(max_size=64))
    declared = draw(st.sampled_from((len(header), len(header) + 1, 0, 2**63, draw(st.integers(0, 2**64 - 1)))))
    return struct.pack("<Q", declared) + header + draw(st.binary(max_size=256))


@FUZZ
@given(data=safetensors_files() | st.binary(max_size=300))
def test_the_safetensors_reader_refuses_garbage_cleanly(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / "adapter_model.safetensors"
        path.write_bytes(data)
        try:
            read = read_tensors("fuzz", path)
        except AdapterError as error:
            _refused_cleanly(error)
            return
        for tensor in read.values():
            assert isinstance(tensor, torch.Tensor)


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, ModelSpec]]:
    """One valid adapter of every format, and the spec of the model it fits."""
    root = tmp_path_factory.mktemp("fuzz-originals")
    base = tiny_llama(seed=0, layers=2)
    peft_spec, hub_spec = ModelSpec.from_hf_model(base), ModelSpec.from_hf_model(hub_model())
    made = {"peft_lora": (make_peft_lora(base, root / "lora", seed=1, r=4, lora_alpha=8,
                                         target_modules=["q_proj", "v_proj", "down_proj"]), peft_spec)}
    make_peft_prefix(base, root / "prefix", seed=2, tokens=3, projection=True)
    made["peft_prefix"] = (root / "prefix", peft_spec)
    for name in ("par_bn", "prefix_tuning", "mam"):
        made[name] = (shutil.copytree(HUB / name, root / name), hub_spec)
    save_native(load_adapter("mam", HUB / "mam", hub_spec), root / "native", hub_spec)
    made["native"] = (root / "native", hub_spec)
    for name, (path, spec) in made.items():   # each original is valid, so mutations start from real files
        assert load_adapter(name, path, spec).name == name
    return made


def _weights_file(directory: Path) -> Path:
    return next(p for p in directory.iterdir() if p.suffix == ".safetensors")


@st.composite
def tensor_edits(draw: st.DrawFn, keys: list[str]) -> list[tuple[str, str, torch.Tensor | None]]:
    """Up to three edits: ("replace", key, tensor), ("drop", key, None) or ("add", new key, tensor)."""
    edits = []
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(("replace", "drop", "add")))
        key = draw(st.sampled_from(keys)) if kind != "add" else draw(st.text(min_size=1, max_size=40))
        edits.append((kind, key, None if kind == "drop" else draw(tensors())))
    return edits


@FUZZ
@given(data=st.data())
def test_every_format_reader_refuses_random_configs_and_tensors_cleanly(originals, data) -> None:
    name = data.draw(st.sampled_from(sorted(originals)))
    source, spec = originals[name]
    with tempfile.TemporaryDirectory() as root:
        path = shutil.copytree(source, Path(root) / name)
        config_file = path / "adapter_config.json"
        config = json.loads(config_file.read_text())
        if data.draw(st.booleans()):
            config_file.write_text(json.dumps(data.draw(config_mutations(config))))
        weights = _weights_file(path)
        stored = load_file(str(weights))
        for kind, key, tensor in data.draw(tensor_edits(sorted(stored))):
            if kind == "drop":
                stored.pop(key, None)
            else:
                stored[key] = tensor.contiguous()
        save_file(stored, str(weights))
        try:
            loaded = load_adapter(name, path, spec)
        except AdapterError as error:
            _refused_cleanly(error)
            return
        assert loaded.name == name and loaded.methods
