"""What a submitter holds of its request, and the admission count that bounds the waiting queue."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from server.engine.errors import Overloaded


class RequestHandle:
    """One submitted request as its submitter holds it: `cancel()` ends exactly this request, never another
    that happens to carry the same (client-chosen) request_id. Thread-safe; cancelling twice, or after the
    request finished, does nothing."""

    def __init__(self, request_id: str, cancel: Callable[[], None]) -> None:
        self.request_id = request_id
        self._cancel = cancel
        self._cancelled = False

    def cancel(self) -> None:
        if not self._cancelled:
            self._cancelled = True
            self._cancel()


class AdmissionGate:
    """Counts requests from submission until they leave the waiting queue for the running batch (or end).

    `enter` is taken on the submitting thread under a lock, so at no instant do more than `limit` requests wait,
    however many arrive at once: the excess is refused at once (Overloaded), not after it reached the queue.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._count = 0

    def enter(self) -> None:
        with self._lock:
            if self._count >= self.limit:
                raise Overloaded(f"the waiting queue is full ({self.limit} requests)")
            self._count += 1

    def leave(self) -> None:
        with self._lock:
            self._count -= 1

    @property
    def count(self) -> int:
        return self._count


@dataclass(frozen=True)
class EngineStats:
    """What the engine looked like at the end of its last step (or command): published by the engine thread as
    one immutable object, so readers on other threads never walk its live queues."""

    running: int             # sequences in the running batch
    waiting: int             # sequences in the waiting queue (new, or preempted)
    total_blocks: int
    free_blocks: int
    block_size: int          # tokens per KV block
    kv_usage: float          # fraction of KV blocks in use, 0 to 1
    max_batch_size: int
    max_waiting: int
    steps: int = 0           # engine steps run so far
    prefix_cache_queries: int = 0   # prompt tokens looked up in the prefix cache at admission, so far
    prefix_cache_hits: int = 0      # of those, found cached (their K/V reused, not computed)
