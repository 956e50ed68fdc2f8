"""Checks shared by the format readers: a tensor's dtype and shape, conversion to the served dtype, options."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from adapters_store.errors import AdapterError
from adapters_store.safetensors_io import check_finite


def served_tensor(adapter: str, file: Path, key: str, tensor: torch.Tensor, shape: tuple[int, ...],
                  dtype: torch.dtype, why: str = "") -> torch.Tensor:
    """`tensor` checked (floating point, exactly `shape`) and converted to a contiguous CPU tensor in `dtype`.

    `why` explains the expected shape in the error message (which option or model size it follows from).
    """
    if not tensor.is_floating_point():
        raise AdapterError("bad_dtype", f"tensor {key!r} in {file.name} has dtype {tensor.dtype}, not a "
                           "floating-point type", adapter=adapter, path=str(file))
    if tuple(tensor.shape) != tuple(shape):
        raise AdapterError("shape_mismatch", f"tensor {key!r} in {file.name} has shape {list(tensor.shape)}, "
                           f"expected {list(shape)}{f' ({why})' if why else ''}", adapter=adapter, path=str(file))
    return to_served(adapter, file, key, tensor, dtype)


# Adapters are trained and shipped in float16/bfloat16 as often as in float32; a weight beyond float16's range cannot
# have come from such training and would overflow when served in half precision. Trained adapter weights sit many
# orders of magnitude below this, so no real adapter is refused; an adapter scaled into overflow (×1e19) is.
MAX_WEIGHT_MAGNITUDE = 65504.0


def to_served(adapter: str, file: Path, key: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Contiguous CPU tensor in the served dtype; refuses values that overflow it or lie beyond any trained range."""
    out = tensor.to(device="cpu", dtype=dtype).contiguous()
    if out.dtype != tensor.dtype:
        check_finite(adapter, file, key, out, after=f" after conversion from {tensor.dtype} to {dtype}")
    largest = float(out.abs().max()) if out.numel() else 0.0
    if largest > MAX_WEIGHT_MAGNITUDE:
        raise AdapterError("out_of_range", f"tensor {key!r} in {file.name} holds a value of magnitude {largest:.3g}; "
                           f"adapter weights beyond {MAX_WEIGHT_MAGNITUDE:g} are refused (no trained adapter has "
                           "them; they overflow in half precision)", adapter=adapter, path=str(file))
    return out


def bad_config(adapter: str, file: Path, option: str, message: str) -> AdapterError:
    return AdapterError("bad_config", f"{file.name} option {option!r} {message}", adapter=adapter, path=str(file))


def unsupported(adapter: str, file: Path, option: str, value: Any, why: str) -> AdapterError:
    return AdapterError("unsupported_option", f"{file.name} sets {option}={value!r}: {why}",
                        adapter=adapter, path=str(file))


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(adapter: str, file: Path, option: str, value: Any) -> int:
    if not is_int(value) or value <= 0:
        raise bad_config(adapter, file, option, f"must be a positive integer, not {value!r}")
    return value


def finite_number(adapter: str, file: Path, option: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise bad_config(adapter, file, option, f"must be a finite number, not {value!r}")
    return float(value)
