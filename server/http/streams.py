"""Several engine requests (the choices of one HTTP request) as one asyncio stream of (choice index, output).

EngineStream (server/service/stream.py) does this for one request; HTTP requests may carry n prompts × n choices,
whose outputs are wanted interleaved in arrival order, through one queue.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from server.engine.admission import RequestHandle
from server.engine.engine import Engine
from server.engine.request import GenerationRequest, GenerationResult, RequestOutput


class MultiStream:
    """Submits requests together and yields their outputs; cancels every unfinished one on close (a client that
    goes away frees its KV blocks at the next engine step)."""

    def __init__(self, engine: Engine, requests: list[GenerationRequest]) -> None:
        self.engine = engine
        self.requests = requests
        self._queue: asyncio.Queue[tuple[int, RequestOutput]] = asyncio.Queue()
        self._unfinished: set[int] = set()
        self._handles: dict[int, RequestHandle] = {}   # by choice index: cancel this request, not its request_id

    async def __aenter__(self) -> MultiStream:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def open(self) -> None:
        """Submits every request (tokenizing off the event loop); if one is refused, cancels the others and
        raises its error (InvalidRequest, UnknownAdapter, Overloaded, ShuttingDown)."""
        loop = asyncio.get_running_loop()
        queue = self._queue

        def sink_for(index: int):  # noqa: ANN202 — a closure per choice
            def sink(out: RequestOutput) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, (index, out))
            return sink

        def submit_all() -> None:
            for index, request in enumerate(self.requests):
                self._handles[index] = self.engine.submit(request, sink_for(index))
                self._unfinished.add(index)

        submitted = loop.run_in_executor(None, submit_all)
        try:
            await asyncio.shield(submitted)
        except asyncio.CancelledError:
            # The client went away while the prompts were being read: cancel them once they are submitted.
            submitted.add_done_callback(lambda _: self.close())
            raise
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Cancels every request that has not finished (only enqueues: safe anywhere, any number of times)."""
        for index in sorted(self._unfinished):
            self._cancel(index)
        self._unfinished.clear()

    def _cancel(self, index: int) -> None:
        handle = self._handles.get(index)   # every unfinished choice was submitted, so it has a handle
        if handle is not None:
            handle.cancel()

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) until every request has finished; raises an error the engine reports for one."""
        while self._unfinished:
            index, out = await self._queue.get()
            if out.finished:
                self._unfinished.discard(index)
            if out.error is not None:
                raise out.error
            yield index, out

    async def results(self) -> list[GenerationResult]:
        """Every request's result, in request order."""
        results: list[GenerationResult | None] = [None] * len(self.requests)
        async for index, out in self.outputs():
            if out.result is not None:
                results[index] = out.result
        if any(result is None for result in results):
            raise RuntimeError("the engine ended a request without a result")
        return [result for result in results if result is not None]
