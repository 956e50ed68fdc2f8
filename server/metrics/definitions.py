"""The metrics updated as things happen (counters, histograms), in one registry per server.

Gauges that describe the present (queue depth, KV usage, residency) are read when scraped: see
collectors.py and gateway.py. Names follow Prometheus conventions: the `deltaserve_` prefix, base
units in the name, counters ending in `_total`. Histograms are labelled at most by adapter method,
never by adapter name (bounded cardinality).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram

from adapters_store.errors import REASONS
from adapters_store.events import DELTA_REJECTED
from server.engine.request import FinishReason

PREFIX = "deltaserve_"
BASE_METHOD = "base"   # the `method` label of requests that name no adapter

# From ~1 ms (a GPU decode step) to minutes (a long CPU generation under load).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                   2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)
# One token or one step: ~1 ms on a GPU, tens to hundreds of ms on a CPU with a large batch.
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
                0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 60.0)
LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

# outcome label of deltaserve_requests_total -> the finish_reason values it comes with.
COMPLETED, CANCELLED, FAILED, REJECTED = "completed", "cancelled", "failed", "rejected"
REJECT_REASONS = ("invalid_argument", "adapter_not_found", "overloaded", "shutting_down")
OUTCOMES = {
    COMPLETED: tuple(r.value for r in FinishReason if r is not FinishReason.CANCELLED),
    CANCELLED: (FinishReason.CANCELLED.value,),
    FAILED: (FinishReason.CANCELLED.value,),
    REJECTED: REJECT_REASONS,
}


def count_buckets(limit: int) -> tuple[float, ...]:
    """0, 1, 2, 4, ... up to and including `limit`: for counts per step (batch size, adapters)."""
    bounds, value = [0.0, 1.0], 2
    while value < limit:
        bounds.append(float(value))
        value *= 2
    bounds.append(float(max(limit, 1)))
    return tuple(sorted(set(bounds)))


@dataclass
class Metrics:
    """Every event-driven metric of one server, registered in its own registry."""

    requests: Counter
    prompt_tokens: Counter
    generation_tokens: Counter
    time_to_first_token: Histogram
    inter_token_latency: Histogram
    e2e_latency: Histogram
    queue_time: Histogram
    batch_size: Histogram
    step_adapters: Histogram
    step_duration: Histogram
    preemptions: Counter
    step_failures: Counter
    nonfinite_outputs: Counter
    adapter_load_time: Histogram
    adapter_load_failures: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry, max_batch_size: int, max_adapters: int) -> Metrics:
        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, registry=registry, buckets=buckets)

        metrics = cls(
            requests=counter("requests_total", "Requests that ended, by outcome (completed, cancelled, failed, "
                             "rejected) and finish reason (for rejected: why)", ("outcome", "finish_reason")),
            prompt_tokens=counter("prompt_tokens_total", "Prompt tokens prefilled (a request's first time only)"),
            generation_tokens=counter("generation_tokens_total", "Tokens generated"),
            time_to_first_token=histogram("time_to_first_token_seconds", "From submission to the first token",
                                          LATENCY_BUCKETS, ("method",)),
            inter_token_latency=histogram("inter_token_latency_seconds", "Between two tokens of one request",
                                          STEP_BUCKETS, ("method",)),
            e2e_latency=histogram("e2e_request_latency_seconds", "From submission to the last output (any outcome "
                                  "but rejected)", LATENCY_BUCKETS, ("method",)),
            queue_time=histogram("request_queue_time_seconds", "From submission to the first scheduled step",
                                 LATENCY_BUCKETS, ("method",)),
            batch_size=histogram("step_batch_size", "Sequences in one engine step (prefills and decodes)",
                                 count_buckets(max_batch_size)),
            step_adapters=histogram("step_distinct_adapters", "Distinct adapters in one engine step (the base "
                                    "model not counted)", count_buckets(min(max_adapters, max_batch_size))),
            step_duration=histogram("step_duration_seconds", "Wall time of one engine step (schedule, model, "
                                    "sampling, outputs)", STEP_BUCKETS),
            preemptions=counter("preemptions_total", "Sequences preempted (KV blocks freed, recomputed later)"),
            step_failures=counter("step_failures_total", "Engine steps that raised (their requests failed)"),
            nonfinite_outputs=counter("nonfinite_outputs_total", "Requests failed because their logits were not "
                                      "finite (never answered), by adapter method; GetAdapter names the adapter",
                                      ("method",)),
            adapter_load_time=histogram("adapter_load_duration_seconds", "Reading and validating one adapter",
                                        LOAD_BUCKETS, ("method",)),
            adapter_load_failures=counter("adapter_load_failures_total", "Adapters refused, by reason",
                                          ("reason",)),
        )
        metrics._initialise_labels()
        return metrics

    def _initialise_labels(self) -> None:
        # Known label values start at 0, so rate() and absent() work before the first event.
        for outcome, reasons in OUTCOMES.items():
            for reason in reasons:
                self.requests.labels(outcome, reason)
        for reason in sorted(REASONS | {DELTA_REJECTED}):
            self.adapter_load_failures.labels(reason)
        self.nonfinite_outputs.labels(BASE_METHOD)
        for histogram in (self.time_to_first_token, self.inter_token_latency, self.e2e_latency, self.queue_time):
            histogram.labels(BASE_METHOD)


def method_label(methods: tuple[str, ...] | list[str]) -> str:
    """The `method` label of an adapter: its methods sorted and joined by '+' (e.g. "bottleneck+prefix")."""
    return "+".join(sorted(methods)) or BASE_METHOD
