"""Gauges read when scraped: requests in flight, KV cache, adapter residency, static configuration."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from adapters_store.store import AdapterStore
from adapters_store.versions import Tier
from server.engine.admission import EngineStats
from server.engine.residency import AdapterSlots
from server.metrics.definitions import PREFIX, method_label
from server.metrics.inflight import InFlight

TIERS = tuple(tier.value for tier in Tier)   # device, host, disk


@dataclass(frozen=True)
class ModelLabels:
    """What `deltaserve_model_info` says about the served model."""

    model: str
    architecture: str
    dtype: str
    device: str


class ServerStateCollector(Collector):
    """Engine and adapter gauges computed at scrape time: the engine's published snapshot (never its live
    queues), the in-flight counts and the adapter store (no engine-side work)."""

    def __init__(self, inflight: InFlight, stats: Callable[[], EngineStats], store: AdapterStore,
                 slots: AdapterSlots, model: ModelLabels) -> None:
        self.inflight = inflight
        self.stats = stats
        self.store = store
        self.slots = slots
        self.model = model

    def collect(self) -> Iterator[Metric]:
        yield from self._engine()
        yield from self._adapters()
        yield from self._static()

    def _engine(self) -> Iterator[Metric]:
        now = self.inflight.snapshot()
        yield GaugeMetricFamily(PREFIX + "requests_running", "Requests in the running batch", value=now.running)
        yield GaugeMetricFamily(PREFIX + "requests_waiting", "Requests in the waiting queue (not yet scheduled, "
                                "or preempted)", value=now.waiting)
        stats = self.stats()
        yield GaugeMetricFamily(PREFIX + "kv_cache_usage_ratio", "Fraction of KV cache blocks in use (0 to 1)",
                                value=stats.kv_usage)
        yield CounterMetricFamily(PREFIX + "prefix_cache_queries", "Prompt tokens looked up in the prefix cache "
                                  "(tokens)", value=stats.prefix_cache_queries)
        yield CounterMetricFamily(PREFIX + "prefix_cache_hits", "Prompt tokens found in the prefix cache, their "
                                  "keys/values reused (tokens; hit rate = hits / queries)",
                                  value=stats.prefix_cache_hits)

    def _adapters(self) -> Iterator[Metric]:
        registered: Counter[str] = Counter()
        by_tier: dict[str, Counter[str]] = {tier: Counter() for tier in TIERS}
        for version in self.store.adapters.values():
            method = method_label(version.methods)
            registered[method] += 1
            by_tier[version.tier.value][method] += 1
        family = GaugeMetricFamily(PREFIX + "adapters_registered", "Adapters the server can serve, by method",
                                   labels=["method"])
        for method in sorted(registered):
            family.add_metric([method], registered[method])
        yield family
        family = GaugeMetricFamily(PREFIX + "adapters_resident", "Registered adapters by where their weights are: "
                                   "device (in a slot, servable at once), host (in host memory only) or disk "
                                   "(in their files only)",
                                   labels=["method", "tier"])
        for method in sorted(registered):
            for tier in TIERS:
                family.add_metric([method, tier], by_tier[tier][method])
        yield family
        yield GaugeMetricFamily(PREFIX + "adapter_device_slots", "Adapter slots on the device (the most adapters "
                                "resident at once)", value=self.slots.num_slots)

    def _static(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(PREFIX + "model_info", "The served model (always 1)",
                                 labels=["model", "architecture", "dtype", "device"])
        info.add_metric([self.model.model, self.model.architecture, self.model.dtype, self.model.device], 1)
        yield info
        stats = self.stats()
        cache = GaugeMetricFamily(PREFIX + "cache_config_info", "KV cache geometry (always 1)",
                                  labels=["block_size", "num_blocks"])
        cache.add_metric([str(stats.block_size), str(stats.total_blocks)], 1)
        yield cache
