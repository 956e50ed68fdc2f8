"""Gauges for the Kubernetes Gateway API Inference Extension (its endpoint picker, "EPP").

The EPP's model-server protocol reads, per pod: the waiting-queue length (gauge), the running
requests (gauge), the KV cache usage (gauge, a fraction 0..1), and for LoRA affinity one
`lora_requests_info` gauge whose labels carry `running_lora_adapters` and `waiting_lora_adapters`
(comma-separated adapter names) and `max_lora` (how many adapters fit on the device at once); its
value is the time it was updated. Optionally `cache_config_info` with a `block_size` label.

Names are configurable in the EPP (--total-queued-requests-metric, --total-running-requests-metric,
--kv-cache-usage-percentage-metric, --lora-info-metric, --cache-info-metric); the defaults are
vLLM's, which contain ':'. promtool's linter rejects ':' in names, so the vLLM names are exported
only with --metrics-vllm-compat; otherwise point the EPP at the deltaserve_ names (docs/metrics.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.engine.admission import EngineStats
from server.metrics.definitions import PREFIX
from server.metrics.inflight import InFlight

LORA_LABELS = ["running_lora_adapters", "waiting_lora_adapters", "max_lora"]
VLLM = "vllm:"


class GatewayCollector(Collector):
    """`deltaserve_lora_requests_info`, and with `vllm_names` the vLLM-named gauges the EPP reads by default."""

    def __init__(self, inflight: InFlight, stats: Callable[[], EngineStats], max_lora: int, vllm_names: bool) -> None:
        self.inflight = inflight
        self.stats = stats
        self.max_lora = max_lora
        self.vllm_names = vllm_names

    def collect(self) -> Iterator[Metric]:
        now = self.inflight.snapshot()
        lora = [",".join(now.running_adapters), ",".join(now.waiting_adapters), str(self.max_lora)]
        stamp = time.time()
        yield _lora_info(PREFIX + "lora_requests_info", lora, stamp)
        if not self.vllm_names:
            return
        yield _lora_info(VLLM + "lora_requests_info", lora, stamp)
        yield GaugeMetricFamily(VLLM + "num_requests_waiting", "Requests waiting (= deltaserve_requests_waiting)",
                                value=now.waiting)
        yield GaugeMetricFamily(VLLM + "num_requests_running", "Requests running (= deltaserve_requests_running)",
                                value=now.running)
        stats = self.stats()
        usage = stats.kv_usage
        for name in ("kv_cache_usage_perc", "gpu_cache_usage_perc"):   # the EPP's newer and older default
            yield GaugeMetricFamily(VLLM + name, "KV cache usage, 0 to 1 (= deltaserve_kv_cache_usage_ratio)",
                                    value=usage)
        cache = GaugeMetricFamily(VLLM + "cache_config_info", "KV cache geometry (= deltaserve_cache_config_info)",
                                  labels=["block_size", "num_gpu_blocks"])
        cache.add_metric([str(stats.block_size), str(stats.total_blocks)], 1)
        yield cache


def _lora_info(name: str, labels: list[str], stamp: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, "Adapters of running and waiting requests, and the most adapters on the "
                               "device at once (labels); the value is when this was read (Unix seconds)",
                               labels=LORA_LABELS)
    family.add_metric(labels, stamp)
    return family
