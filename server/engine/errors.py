"""Domain errors the service maps to gRPC status codes."""


class InvalidRequest(ValueError):
    """The request itself is wrong (INVALID_ARGUMENT)."""


class UnknownAdapter(LookupError):
    """The request names an adapter that is not registered (NOT_FOUND)."""


class Overloaded(RuntimeError):
    """The waiting queue is full (RESOURCE_EXHAUSTED)."""


class UntrustedOutput(RuntimeError):
    """The model's logits for this request were not finite: no answer is given (INTERNAL)."""


class ShuttingDown(RuntimeError):
    """The engine no longer accepts requests (UNAVAILABLE)."""
