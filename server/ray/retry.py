"""Calls to the engine deployment that survive a replica's death: sent again while nothing has gone back to the
client (Ray's router skips the dead replica), a retryable status (UNAVAILABLE) once something has."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

log = logging.getLogger("deltaserve.ray")

REPLICA_GONE = (RayActorError, ActorDiedError, ActorUnavailableError)
BACKOFF_S = 0.25  # times the attempt: Ray's router learns of the death and routes elsewhere meanwhile
T = TypeVar("T")


class ReplicaLost(Exception):
    """The replica serving a request died after part of the answer went to the client (or on every retry)."""


class Failover:
    """Sends a call again up to `retries` times when its replica dies before anything went back; counts what
    happened (`sent_again`, `lost_mid_stream`, `gave_up`)."""

    def __init__(self, retries: int) -> None:
        self.retries = retries
        self.sent_again = 0
        self.lost_mid_stream = 0
        self.gave_up = 0

    async def call(self, make: Callable[[], Awaitable[T]]) -> T:
        """Awaits `make()`, again when the replica serving it dies."""
        for attempt in range(self.retries + 1):
            try:
                return await make()
            except REPLICA_GONE as error:
                await self._died(attempt, error)
        raise self._give_up()

    async def stream(self, make: Callable[[], AsyncIterator[Any]]) -> AsyncGenerator[Any, None]:
        """Yields `make()`'s items; starts it again when its replica dies before the first item, raises
        ReplicaLost when it dies after."""
        for attempt in range(self.retries + 1):
            started = False
            items = make()
            try:
                async for item in items:
                    started = True
                    yield item
                return
            except REPLICA_GONE as error:
                if started:
                    self.lost_mid_stream += 1
                    raise ReplicaLost("the replica serving this stream died mid-answer; send the request again") \
                        from None
                await self._died(attempt, error)
            finally:
                cancel = getattr(items, "cancel", None)   # the consumer went away: end the replica's work too
                if cancel is not None:
                    cancel()
        raise self._give_up()

    async def _died(self, attempt: int, error: BaseException) -> None:
        log.warning("replica died serving a request (attempt %d of %d): %s", attempt + 1, self.retries + 1,
                    type(error).__name__)
        if attempt < self.retries:
            self.sent_again += 1
            await asyncio.sleep(BACKOFF_S * (attempt + 1))

    def _give_up(self) -> ReplicaLost:
        self.gave_up += 1
        return ReplicaLost(f"the replica serving this request died {self.retries + 1} times; retry later")

    def counts(self) -> dict[str, int]:
        return {"sent_again": self.sent_again, "lost_mid_stream": self.lost_mid_stream, "gave_up": self.gave_up}
