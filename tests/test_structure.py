"""The layering the architecture promises, checked on the source: dependencies point one way."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from server.deltas.base import DeltaMethod
from server.model.attention import PagedKVCache

SERVER = Path(__file__).resolve().parents[1] / "server"


def _imports(package: str) -> set[str]:
    """Every module the package's files import (absolute names)."""
    found: set[str] = set()
    for path in (SERVER / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
    return found


@pytest.mark.parametrize("package", ["deltas", "model", "kernels"])
def test_below_the_engine_nothing_imports_the_engine_or_the_services(package):
    if not (SERVER / package).exists():
        pytest.skip(f"no server/{package}")
    upward = sorted(m for m in _imports(package)
                    if m.startswith(("server.engine", "server.service", "server.http", "grpc", "fastapi")))
    assert upward == []


def test_the_delta_interface_has_no_member_of_one_method():
    members = {name for name in vars(DeltaMethod) if not name.startswith("_")}
    # launch_key and capturable are generic: what a captured decode step depends on, whether a slot can be in one
    assert members == {"check", "place", "clear", "prepare", "launch_key", "capturable"}


def test_the_kv_cache_has_no_region_of_its_own_per_adapter():
    members = {name for name in vars(PagedKVCache) if not name.startswith("__")}
    assert not {name for name in members if "prefix" in name or "slot" in name}
