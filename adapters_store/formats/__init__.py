"""Adapter format readers, registered by name (as PEFT registers its tuners).

A new format is one module with a reader object (`name`, `matches(config)`, `read(name, path, config,
spec)`) and one `register_format(...)` call below or in the caller's own code.
"""

from adapters_store.formats.adapterhub import AdapterHubReader
from adapters_store.formats.native import NativeReader
from adapters_store.formats.peft_lora import PeftLoraReader
from adapters_store.formats.peft_prefix import PeftPrefixReader
from adapters_store.formats.registry import (
    FormatReader,
    detect,
    register_format,
    registered_formats,
    unregister_format,
)

register_format(PeftLoraReader(), replace=True)
register_format(PeftPrefixReader(), replace=True)
register_format(AdapterHubReader(), replace=True)
register_format(NativeReader(), replace=True)

__all__ = ["AdapterHubReader", "FormatReader", "NativeReader", "PeftLoraReader", "PeftPrefixReader", "detect",
           "register_format", "registered_formats", "unregister_format"]
