"""Why an adapter was refused: a short machine-readable reason and a message a person can act on."""

from __future__ import annotations

# Every reason an AdapterError may carry; callers (e.g. the gRPC layer) map them to status codes.
REASONS = frozenset({
    "missing_weights",     # no weights file, an empty one, or a LoRA A without its B
    "corrupt_file",        # the weights file cannot be parsed (truncated, not safetensors)
    "pickle_refused",      # only a pickle (.bin, .pt, ...) is there: never loaded
    "bad_config",          # adapter_config.json missing, not JSON, or an option of the wrong type
    "shape_mismatch",      # a tensor does not fit the served model or the configured rank
    "unknown_module",      # a tensor for a module the served model does not have
    "untargeted_module",   # a tensor for a module the adapter's own config does not target
    "non_finite",          # NaN or Inf in a tensor (or after conversion to the served dtype)
    "out_of_range",        # a weight beyond any trained range (|w| > 65504, float16's largest finite value)
    "bad_dtype",           # a tensor that is not floating point
    "unsupported_option",  # an option or tensor kind this server cannot apply faithfully
    "unknown_format",      # no registered format reader recognises the config
    "load_failed",         # anything unexpected while loading (an I/O error, a bug): logged with its traceback
})


QUOTE_LIMIT = 64


def quote(text: str, limit: int = QUOTE_LIMIT) -> str:
    """`text` as a message quotes user input: its repr, cut short past `limit` characters (saying how long it was),
    so an error never echoes unbounded input back."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


class AdapterError(Exception):
    """An adapter that cannot be served, with the reason code and what exactly is at fault."""

    def __init__(self, reason: str, message: str, *, adapter: str | None = None, path: str | None = None) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown AdapterError reason {reason!r}; expected one of {sorted(REASONS)}")
        self.reason = reason
        self.message = message
        self.adapter = adapter
        self.path = path
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"adapter {self.adapter!r}" if self.adapter is not None else "adapter"
        return f"{where}: {self.message} [{self.reason}]"


class AdapterNotFound(KeyError):
    """No adapter of that name is being served (it may have been rejected: see `detail`)."""

    def __init__(self, name: str, detail: str = "") -> None:
        self.name = name
        self.detail = detail
        super().__init__(name)

    def __str__(self) -> str:
        # KeyError's own str() is the repr of its key, which reads badly in logs and gRPC details.
        return f"adapter {quote(self.name)} not found" + (f": {self.detail}" if self.detail else "")
