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


async def call(make: Callable[[], Awaitable[T]], retries: int) -> T:
    """Awaits `make()`, again up to `retries` times when the replica serving it dies."""
    for attempt in range(retries + 1):
        try:
            return await make()
        except REPLICA_GONE as error:
            log.warning("replica died serving a request (attempt %d of %d): %s", attempt + 1, retries + 1,
                        type(error).__name__)
            await asyncio.sleep(BACKOFF_S * (attempt + 1))
    raise ReplicaLost(f"the replica serving this request died {retries + 1} times; retry later")


async def stream(make: Callable[[], AsyncIterator[Any]], retries: int) -> AsyncGenerator[Any, None]:
    """Yields `make()`'s items; starts it again when its replica dies before the first item, raises ReplicaLost
    when it dies after."""
    for attempt in range(retries + 1):
        started = False
        items = make()
        try:
            async for item in items:
                started = True
                yield item
            return
        except REPLICA_GONE as error:
            if started:
                raise ReplicaLost("the replica serving this stream died mid-answer; send the request again") from None
            log.warning("replica died before a stream's first item (attempt %d of %d): %s", attempt + 1,
                        retries + 1, type(error).__name__)
            await asyncio.sleep(BACKOFF_S * (attempt + 1))
        finally:
            cancel = getattr(items, "cancel", None)   # the consumer went away: end the replica's work too
            if cancel is not None:
                cancel()
    raise ReplicaLost(f"the replica serving this request died {retries + 1} times; retry later")
