"""The registry of adapter format readers: each says whether a config is its format and reads it."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from os import PathLike
from typing import Any, Protocol, runtime_checkable

from adapters_store.errors import AdapterError
from adapters_store.spec import ModelSpec
from adapters_store.types import AdapterWeights


@runtime_checkable
class FormatReader(Protocol):
    """Reads one on-disk adapter format into validated AdapterWeights."""

    name: str

    def matches(self, config: Mapping[str, Any]) -> bool:
        """Whether adapter_config.json describes an adapter of this format."""
        ...

    def read(self, name: str, path: str | PathLike[str], config: dict, spec: ModelSpec) -> AdapterWeights:
        """Loads and validates the adapter in directory `path`; raises AdapterError."""
        ...


_readers: dict[str, FormatReader] = {}
_lock = threading.Lock()


def register_format(reader: FormatReader, *, replace: bool = False) -> FormatReader:
    """Adds a reader; detection tries readers in registration order. Returns the reader."""
    if not isinstance(reader, FormatReader):
        raise TypeError(f"{reader!r} is not a FormatReader (needs name, matches(), read())")
    with _lock:
        if reader.name in _readers and not replace:
            raise ValueError(f"an adapter format named {reader.name!r} is already registered")
        _readers[reader.name] = reader
    return reader


def unregister_format(name: str) -> None:
    with _lock:
        _readers.pop(name, None)


def registered_formats() -> tuple[str, ...]:
    with _lock:
        return tuple(_readers)


def detect(config: Mapping[str, Any], path: str | PathLike[str], name: str | None = None) -> FormatReader:
    """The first registered reader whose `matches(config)` is true; unknown_format if none is."""
    with _lock:
        readers = list(_readers.values())
    for reader in readers:
        if reader.matches(config):
            return reader
    if "peft_type" in config:
        what = f"peft_type {config['peft_type']!r}"
    elif isinstance(config.get("config"), dict):
        what = "an AdapterHub config"
    else:
        what = f"a config with keys {sorted(config)[:8]}"
    raise AdapterError("unknown_format", f"{path}/adapter_config.json describes {what}, which no registered "
                       f"format reads (known formats: {', '.join(r.name for r in readers) or 'none'})",
                       adapter=name, path=str(path))
