"""Adapter format readers, registered by name (as PEFT registers its tuners).

A new format is one module with a reader object (`name`, `matches(config)`, `read(name, path, config,
spec)`) and one `register_format(...)` call below or in the caller's own code.
"""

from adapters_store.formats.peft_lora import PeftLoraReader
from adapters_store.formats.registry import (
    FormatReader,
    detect,
    register_format,
    registered_formats,
    unregister_format,
)

register_format(PeftLoraReader(), replace=True)

__all__ = ["FormatReader", "PeftLoraReader", "detect", "register_format", "registered_formats",
           "unregister_format"]
