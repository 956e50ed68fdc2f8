"""Bridges the engine thread's outputs to an asyncio handler."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from server.engine.admission import RequestHandle
from server.engine.engine import Engine
from server.engine.request import GenerationRequest, RequestOutput


class EngineStream:
    """Submits one request and yields its outputs; cancels it if the consumer goes away."""

    def __init__(self, engine: Engine, request: GenerationRequest) -> None:
        self.engine = engine
        self.request = request
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._finished = False
        self._handle: RequestHandle | None = None

    async def __aenter__(self) -> EngineStream:
        loop = asyncio.get_running_loop()

        def sink(out: RequestOutput) -> None:
            loop.call_soon_threadsafe(self._queue.put_nowait, out)

        # Tokenizing may take a while for a long prompt: keep the event loop free.
        submitted = loop.run_in_executor(None, self.engine.submit, self.request, sink)
        try:
            self._handle = await asyncio.shield(submitted)
        except asyncio.CancelledError:
            # The caller went away while the prompt was being read: cancel the request once it is submitted.
            submitted.add_done_callback(_cancel_when_submitted)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if not self._finished and self._handle is not None:
            self._handle.cancel()

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        while not self._finished:
            out = await self._queue.get()
            self._finished = out.finished
            if out.error is not None:  # refused after submission (e.g. its adapter's files became unreadable)
                raise out.error
            yield out


def _cancel_when_submitted(submitted: asyncio.Future[RequestHandle]) -> None:
    if not submitted.cancelled() and submitted.exception() is None:
        submitted.result().cancel()
