"""Engine events -> metrics: request outcomes, latencies, tokens, per-step batch shape, in-flight counts."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from prometheus_client.metrics import Histogram

from server.engine.errors import InvalidRequest, Overloaded, ShuttingDown, UnknownAdapter
from server.engine.observer import EngineObserver
from server.engine.request import FinishReason, GenerationRequest, Sequence
from server.engine.scheduler import ScheduledStep
from server.metrics.adapter_usage import AdapterUsage
from server.metrics.definitions import BASE_METHOD, CANCELLED, COMPLETED, FAILED, OUTCOMES, REJECTED, Metrics
from server.metrics.inflight import InFlight

log = logging.getLogger("deltaserve.metrics")

REJECT_REASON = {InvalidRequest: "invalid_argument", UnknownAdapter: "adapter_not_found", Overloaded: "overloaded",
                 ShuttingDown: "shutting_down"}

F = TypeVar("F", bound=Callable[..., None])


def never_raises(hook: F) -> F:
    """A metrics bug must not fail requests: log it (once per hook) and carry on."""
    failed = False

    @functools.wraps(hook)
    def guarded(*args: Any) -> None:
        nonlocal failed
        try:
            hook(*args)
        except Exception:
            if not failed:
                failed = True
                log.exception("metrics hook %s failed (further failures of it are not logged)", hook.__name__)
    return guarded  # type: ignore[return-value]


@dataclass(slots=True)
class _Track:
    """What the observer keeps about one request in the engine."""

    adapter: str
    method: str
    ttft: Histogram
    itl: Histogram
    running: bool = False
    scheduled: bool = False
    failed: bool = False
    last_token: float | None = None


class MetricsObserver(EngineObserver):
    """The engine observer that feeds the Prometheus metrics; `method_of` names an adapter's methods."""

    def __init__(self, metrics: Metrics, usage: AdapterUsage, method_of: Callable[[str], str]) -> None:
        self.metrics = metrics
        self.usage = usage
        self.inflight = InFlight()
        self.method_of = method_of
        self._tracks: dict[int, _Track] = {}     # id(seq) -> track, for sequences in the engine
        self._step_start = 0.0
        self._outcomes = {(outcome, reason): metrics.requests.labels(outcome, reason)
                          for outcome, reasons in OUTCOMES.items() for reason in reasons}

    @never_raises
    def on_reject(self, request: GenerationRequest, error: Exception) -> None:
        reason = next((label for kind, label in REJECT_REASON.items() if isinstance(error, kind)), "invalid_argument")
        self._outcomes[REJECTED, reason].inc()

    @never_raises
    def on_submit(self, seq: Sequence) -> None:
        method = self.method_of(seq.adapter_id) if seq.adapter_id else BASE_METHOD
        m = self.metrics
        self._tracks[id(seq)] = _Track(seq.adapter_id, method, m.time_to_first_token.labels(method),
                                       m.inter_token_latency.labels(method))
        self.inflight.add(seq.adapter_id, running=False)
        if seq.adapter_id:
            self.usage.add_request(seq.adapter_id)

    @never_raises
    def on_schedule(self, step: ScheduledStep) -> None:
        now = self._step_start = time.monotonic()
        for seq in step.prefills:
            track = self._tracks.get(id(seq))
            if track is None:
                continue
            if not track.scheduled:
                track.scheduled = True
                self.metrics.queue_time.labels(track.method).observe(now - seq.arrival)
                self.metrics.prompt_tokens.inc(len(seq.prompt_ids))
                if track.adapter:
                    self.usage.add_prompt_tokens(track.adapter, len(seq.prompt_ids))
            track.running = True
            self.inflight.move(track.adapter, to_running=True)
        if step.preempted:
            self.metrics.preemptions.inc(len(step.preempted))
            for seq in step.preempted:
                track = self._tracks.get(id(seq))
                if track is not None:
                    track.running = False
                    self.inflight.move(track.adapter, to_running=False)

    @never_raises
    def on_token(self, seq: Sequence) -> None:
        track = self._tracks.get(id(seq))
        if track is None:
            return
        now = time.monotonic()
        if track.last_token is None:
            track.ttft.observe(now - seq.arrival)
        else:
            track.itl.observe(now - track.last_token)
        track.last_token = now

    @never_raises
    def on_step(self, seqs: list[Sequence]) -> None:
        m = self.metrics
        m.step_duration.observe(time.monotonic() - self._step_start)
        m.generation_tokens.inc(len(seqs))   # one token each; counted per step, not per token, to stay cheap
        per_adapter: dict[str, int] = {}
        for seq in seqs:
            if seq.adapter_id:
                per_adapter[seq.adapter_id] = per_adapter.get(seq.adapter_id, 0) + 1
        m.batch_size.observe(len(seqs))
        m.step_adapters.observe(len(per_adapter))
        self.usage.add_generation_tokens(per_adapter)

    @never_raises
    def on_finish(self, seq: Sequence, reason: FinishReason) -> None:
        track = self._tracks.pop(id(seq), None)
        if reason is not FinishReason.CANCELLED:
            outcome = COMPLETED
        else:
            outcome = FAILED if track is not None and track.failed else CANCELLED
        self._outcomes[outcome, reason.value].inc()
        if track is not None:
            self.metrics.e2e_latency.labels(track.method).observe(time.monotonic() - seq.arrival)
            self.inflight.remove(track.adapter, track.running)

    @never_raises
    def on_untrusted(self, seq: Sequence) -> None:
        track = self._tracks.get(id(seq))
        if track is not None:
            track.failed = True
        self.metrics.nonfinite_outputs.labels(track.method if track else BASE_METHOD).inc()

    @never_raises
    def on_step_failed(self, error: Exception) -> None:
        self.metrics.step_failures.inc()
        for track in self._tracks.values():
            track.failed = True

