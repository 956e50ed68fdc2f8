"""Loading one adapter directory: its adapter_config.json, its format, its validated weights."""

from __future__ import annotations

import json
from os import PathLike
from pathlib import Path
from typing import Any

from adapters_store.errors import AdapterError
from adapters_store.formats import detect
from adapters_store.spec import ModelSpec
from adapters_store.types import AdapterWeights

CONFIG_FILE = "adapter_config.json"


def read_adapter_config(name: str, path: str | PathLike[str]) -> dict[str, Any]:
    """The adapter's config as a dict; bad_config if it is missing, unreadable or not a JSON object."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        present = sorted(p.name for p in Path(path).iterdir()) if Path(path).is_dir() else []
        raise AdapterError("bad_config", f"no {CONFIG_FILE} in {path} (found: {', '.join(present) or 'nothing'})",
                           adapter=name, path=str(file))
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise AdapterError("bad_config", f"{file} is not valid JSON: {exc}", adapter=name, path=str(file)) from exc
    if not isinstance(config, dict):
        raise AdapterError("bad_config", f"{file} holds a JSON {type(config).__name__}, not an object",
                           adapter=name, path=str(file))
    return config


def load_adapter(name: str, path: str | PathLike[str], spec: ModelSpec) -> AdapterWeights:
    """Reads and validates the adapter in directory `path` against `spec`; raises AdapterError."""
    directory = Path(path)
    if not directory.is_dir():
        raise AdapterError("missing_weights", f"{directory} is not a directory", adapter=name, path=str(directory))
    config = read_adapter_config(name, directory)
    reader = detect(config, directory, name=name)
    return reader.read(name, directory, config, spec)
