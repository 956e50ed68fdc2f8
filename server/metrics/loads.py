"""Adapter store events -> metrics: load time and load failures."""

from __future__ import annotations

from adapters_store.events import StoreListener
from adapters_store.types import AdapterWeights
from server.metrics.definitions import Metrics, method_label


class LoadMetrics(StoreListener):
    """Times successful loads (by method) and counts refusals (by AdapterError reason)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def on_load(self, weights: AdapterWeights, seconds: float) -> None:
        self.metrics.adapter_load_time.labels(method_label(weights.methods)).observe(seconds)

    def on_load_failed(self, name: str, reason: str) -> None:
        self.metrics.adapter_load_failures.labels(reason).inc()
