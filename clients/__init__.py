"""Python client (sync and asyncio) and the deltactl CLI."""

from clients.aio import AsyncDeltaClient, AsyncGenerationStream
from clients.client import DEFAULT_TARGET, DeltaClient, GenerationStream
from clients.messages import GenerationResult, StreamEvent, TokenChunk, build_request

__all__ = [
    "DEFAULT_TARGET",
    "AsyncDeltaClient",
    "AsyncGenerationStream",
    "DeltaClient",
    "GenerationResult",
    "GenerationStream",
    "StreamEvent",
    "TokenChunk",
    "build_request",
]
