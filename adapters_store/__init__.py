"""The adapter store: format readers, validation against the served model, registry."""

from adapters_store.errors import REASONS, AdapterError, AdapterNotFound
from adapters_store.formats import FormatReader, detect, register_format, registered_formats
from adapters_store.loader import load_adapter, read_adapter_config
from adapters_store.spec import ModelSpec
from adapters_store.store import AdapterStore
from adapters_store.types import (
    AdapterWeights,
    BottleneckModule,
    BottleneckParts,
    LoraModule,
    LoraParts,
    PrefixParts,
)

__all__ = [
    "REASONS", "AdapterError", "AdapterNotFound", "AdapterStore", "AdapterWeights", "BottleneckModule",
    "BottleneckParts", "FormatReader", "LoraModule", "LoraParts", "ModelSpec", "PrefixParts", "detect",
    "load_adapter", "read_adapter_config", "register_format", "registered_formats",
]
