"""Per-adapter request and token counters whose label cardinality stays bounded (the N most used)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from server.metrics.definitions import PREFIX

OTHER = "__other__"


@dataclass
class _Counts:
    requests: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0


class AdapterUsage(Collector):
    """Counts requests and tokens per adapter name; exports the `top` most used names, the rest as OTHER.

    Adapters are ranked by their exact number of requests. A count goes to the label the adapter holds
    when it happens: its own name while it is among the top, OTHER otherwise. So every exported series
    only grows (counters stay counters), the sum over labels is exact, and an adapter that enters the
    top N counts under its own name from then on. A name that drops out of the top stops being
    exported (its series ends) and resumes from where it was if it comes back.
    """

    def __init__(self, top: int) -> None:
        self.top = top
        self._lock = threading.Lock()
        self._uses: dict[str, int] = {}      # every adapter ever counted: the ranking
        self._members: dict[str, None] = {}  # at most `top` names with their own label, oldest first
        self._series: dict[str, _Counts] = {OTHER: _Counts()}

    @property
    def enabled(self) -> bool:
        return self.top > 0

    def add_request(self, adapter: str) -> None:
        if not self.enabled:
            return
        with self._lock:
            uses = self._uses[adapter] = self._uses.get(adapter, 0) + 1
            self._rank(adapter, uses)
            self._counts(adapter).requests += 1

    def add_prompt_tokens(self, adapter: str, tokens: int) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._counts(adapter).prompt_tokens += tokens

    def add_generation_tokens(self, per_adapter: dict[str, int]) -> None:
        if not self.enabled or not per_adapter:
            return
        with self._lock:
            for adapter, tokens in per_adapter.items():
                self._counts(adapter).generation_tokens += tokens

    def _rank(self, adapter: str, uses: int) -> None:
        members = self._members
        if adapter in members:
            return
        if len(members) < self.top:
            members[adapter] = None
            return
        weakest = min(members, key=self._uses.__getitem__)   # O(top), once per request at most; ties: oldest
        if uses > self._uses[weakest]:
            del members[weakest]
            members[adapter] = None

    def _counts(self, adapter: str) -> _Counts:
        label = adapter if adapter in self._members else OTHER
        counts = self._series.get(label)
        if counts is None:
            counts = self._series[label] = _Counts()
        return counts

    def snapshot(self) -> dict[str, _Counts]:
        """The exported label values (top adapters and OTHER) with their counts."""
        with self._lock:
            return {label: _Counts(c.requests, c.prompt_tokens, c.generation_tokens)
                    for label, c in self._series.items() if label == OTHER or label in self._members}

    def collect(self) -> Iterator[CounterMetricFamily]:
        if not self.enabled:
            return
        families = (
            (CounterMetricFamily(PREFIX + "adapter_requests", f"Requests per adapter (the {self.top} most used by "
                                 f"name, the rest as {OTHER}; the base model not counted)", labels=["adapter"]),
             "requests"),
            (CounterMetricFamily(PREFIX + "adapter_prompt_tokens", "Prompt tokens prefilled per adapter (labels "
                                 "as adapter_requests_total)", labels=["adapter"]), "prompt_tokens"),
            (CounterMetricFamily(PREFIX + "adapter_generation_tokens", "Tokens generated per adapter (labels as "
                                 "adapter_requests_total)", labels=["adapter"]), "generation_tokens"),
        )
        snapshot = sorted(self.snapshot().items())
        for family, field in families:
            for label, counts in snapshot:
                family.add_metric([label], getattr(counts, field))
            yield family
