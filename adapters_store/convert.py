"""`deltaserve convert`: turns a pickled adapter into the safetensors adapter the server reads, offline.

The server never unpickles. This converter is run once, by hand, on a file its owner trusts; even so it loads
with `torch.load(..., weights_only=True)`, which only rebuilds tensors and plain containers.

- AdapterHub: pytorch_adapter.bin -> adapter.safetensors. AdapterHub's state dict repeats every prefix-tuning
  tensor under each layer's `self_attn.prefix_tuning.pool` (shared storage, which safetensors refuses); the
  copies are checked identical to `prefix_tuning.prefix_tunings...` and dropped.
- PEFT: adapter_model.bin -> adapter_model.safetensors.
adapter_config.json is copied unchanged; nothing else is (AdapterHub prediction heads are not served).
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import torch
from safetensors.torch import save_file

CONFIG_FILE = "adapter_config.json"
# pickle name -> safetensors name, per format
CONVERSIONS = {"pytorch_adapter.bin": "adapter.safetensors", "adapter_model.bin": "adapter_model.safetensors"}
PREFIX_POOL = "self_attn.prefix_tuning.pool.prefix_tunings."
PREFIX_CANONICAL = "prefix_tuning.prefix_tunings."


class ConvertError(ValueError):
    """The source cannot be converted (missing files, not a tensor dict, inconsistent copies)."""


@dataclass(frozen=True)
class Converted:
    """What a conversion wrote."""

    path: Path
    weights_file: str
    tensors: int
    dropped_copies: int


def convert_adapter(src: str | PathLike[str], dst: str | PathLike[str]) -> Converted:
    """Converts the pickled adapter in directory `src` into a new safetensors adapter directory `dst`."""
    source, target = Path(src), Path(dst)
    if not (source / CONFIG_FILE).is_file():
        raise ConvertError(f"{source} has no {CONFIG_FILE}: not an adapter directory")
    pickles = [name for name in CONVERSIONS if (source / name).is_file()]
    if not pickles:
        raise ConvertError(f"{source} holds none of {', '.join(CONVERSIONS)}: nothing to convert")
    if target.resolve() == source.resolve():
        raise ConvertError("the destination must be a new directory, not the source")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConvertError(f"{target} already exists and is not an empty directory")
    try:
        json.loads((source / CONFIG_FILE).read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ConvertError(f"{source / CONFIG_FILE} is not valid JSON: {exc}") from exc
    state = _load(source / pickles[0])
    tensors, dropped = dedup_prefix_copies(state)
    target.mkdir(parents=True, exist_ok=True)
    weights_file = CONVERSIONS[pickles[0]]
    save_file(tensors, str(target / weights_file), metadata={"format": "pt"})
    shutil.copyfile(source / CONFIG_FILE, target / CONFIG_FILE)
    return Converted(path=target, weights_file=weights_file, tensors=len(tensors), dropped_copies=dropped)


def _load(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refusals are UnpicklingError; corrupt files raise many kinds
        raise ConvertError(f"{path} cannot be loaded with torch.load(weights_only=True): {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ConvertError(f"{path} does not hold a dict of named tensors")
    return state


def dedup_prefix_copies(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """AdapterHub's per-layer prefix copies folded into the canonical key; (independent tensors, copies dropped)."""
    kept: dict[str, torch.Tensor] = {}
    copies: list[tuple[str, str, torch.Tensor]] = []
    for key, tensor in state.items():
        if PREFIX_POOL in key:
            # model.layers.3.self_attn.prefix_tuning.pool.prefix_tunings.X... -> model.prefix_tuning.prefix_tunings.X...
            head, tail = key.split(PREFIX_POOL, 1)
            root = head.split("layers.", 1)[0]
            copies.append((key, f"{root}{PREFIX_CANONICAL}{tail}", tensor))
        else:
            kept[key] = tensor
    for key, canonical, tensor in copies:
        reference = kept.setdefault(canonical, tensor)
        if reference.shape != tensor.shape or not torch.equal(reference, tensor):
            raise ConvertError(f"{key} differs from {canonical}: AdapterHub's per-layer prefix copies must be "
                               "identical")
    # Own storage for each tensor: safetensors refuses shared or non-contiguous storage.
    return {key: tensor.detach().contiguous().clone() for key, tensor in sorted(kept.items())}, len(copies)


def main(src: str, dst: str) -> int:
    """The CLI entry: converts, prints what was written; exit 0, or 2 with the reason."""
    try:
        done = convert_adapter(src, dst)
    except (ConvertError, OSError) as exc:
        print(f"deltaserve convert: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {done.path / done.weights_file} ({done.tensors} tensors"
          + (f", {done.dropped_copies} duplicated prefix copies dropped" if done.dropped_copies else "")
          + f") and {done.path / CONFIG_FILE}")
    return 0
