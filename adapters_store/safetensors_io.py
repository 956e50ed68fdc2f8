"""Reading adapter weights: safetensors only. Pickles (.bin, .pt, ...) are never opened."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from adapters_store.errors import AdapterError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def pickle_refusal(adapter: str, pickle_path: Path, safetensors_name: str) -> AdapterError:
    """The error for a weights file that is a pickle, with how to convert it."""
    hint = (f"python -c \"import torch; from safetensors.torch import save_file; "
            f"save_file(torch.load('{pickle_path.name}', weights_only=True), '{safetensors_name}')\"")
    return AdapterError(
        "pickle_refused",
        f"{pickle_path} is a pickle file; pickles are never loaded (unpickling can run arbitrary code). "
        f"Convert it once, where you trust it, to {safetensors_name} in the same directory, e.g. with: {hint}",
        adapter=adapter, path=str(pickle_path))


def find_weights(adapter: str, directory: Path, filename: str) -> Path:
    """`directory/filename` if it is there; otherwise refuses a pickle in its place or says it is missing."""
    path = directory / filename
    if path.is_file():
        return path
    if Path(filename).suffix.lower() in PICKLE_SUFFIXES:
        raise pickle_refusal(adapter, path, filename)
    pickles = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise pickle_refusal(adapter, pickles[0], filename)
    present = sorted(p.name for p in directory.iterdir())
    raise AdapterError("missing_weights", f"no {filename} in {directory} (found: {', '.join(present) or 'nothing'})",
                       adapter=adapter, path=str(path))


def read_tensors(adapter: str, path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file, on CPU; refuses pickles, unreadable files and NaN/Inf."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise pickle_refusal(adapter, path, path.with_suffix(".safetensors").name)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterError("corrupt_file", f"{path} is not a readable safetensors file "
                           f"(truncated or corrupt?): {exc}", adapter=adapter, path=str(path)) from exc
    for key, tensor in tensors.items():
        check_finite(adapter, path, key, tensor)
    return tensors


def check_finite(adapter: str, path: Path, key: str, tensor: torch.Tensor, after: str = "") -> None:
    """Refuses a floating tensor holding NaN or Inf; `after` says what produced it (e.g. a dtype cast)."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise AdapterError("non_finite", f"tensor {key!r} in {path.name} has {bad} NaN/Inf value(s){after}",
                           adapter=adapter, path=str(path))
