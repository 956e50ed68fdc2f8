"""Chooses the kernel backend: once per device type, in this one place.

CPU takes the grouped torch path, CUDA the Triton kernels (the grouped torch path where triton cannot be
imported). `configure(name)` (start-up: --kernels) or DELTASERVE_KERNELS overrides the choice
for every device: torch_ref, torch_grouped or triton.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

from server.kernels.interface import KernelBackend

log = logging.getLogger("deltaserve.kernels")
ENV = "DELTASERVE_KERNELS"
BY_DEVICE = {"cuda": "triton"}
DEFAULT = "torch_grouped"


def _torch_ref() -> KernelBackend:
    from server.kernels.torch_ref import TorchRefBackend

    return TorchRefBackend()


def _torch_grouped() -> KernelBackend:
    from server.kernels.torch_grouped import TorchGroupedBackend

    return TorchGroupedBackend()


def _triton() -> KernelBackend:
    from server.kernels.triton_backend import TritonBackend

    return TritonBackend()


FACTORIES: dict[str, Callable[[], KernelBackend]] = {
    "torch_ref": _torch_ref, "torch_grouped": _torch_grouped, "triton": _triton}
_override: str | None = None
_instances: dict[str, KernelBackend] = {}


def configure(name: str | None) -> None:
    """Forces one backend for every device (None: by device). Call before the deltas are built."""
    global _override
    if name is not None and name not in FACTORIES:
        raise ValueError(f"unknown kernel backend {name!r}; one of {', '.join(FACTORIES)}")
    _override = name


def backend_name(device: torch.device | str) -> str:
    """The backend a device gets: the override, else its device type's."""
    env = os.environ.get(ENV, "auto")
    name = _override or (env if env != "auto" else None) or BY_DEVICE.get(torch.device(device).type, DEFAULT)
    if name not in FACTORIES:
        raise ValueError(f"unknown kernel backend {name!r} in {ENV}; one of {', '.join(FACTORIES)}")
    return name


def get_backend(name: str) -> KernelBackend:
    """The (shared) instance of a named backend."""
    found = _instances.get(name)
    if found is None:
        found = _instances[name] = FACTORIES[name]()
    return found


def select_backend(device: torch.device | str) -> KernelBackend:
    """The backend for a device; triton falls back to torch_grouped when it cannot be imported."""
    name = backend_name(device)
    try:
        return get_backend(name)
    except ImportError as exc:
        if name != "triton":
            raise
        log.warning("triton unavailable (%s): using the grouped torch kernels", exc)
        return get_backend(DEFAULT)
