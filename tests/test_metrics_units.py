"""Metrics parts without a server: bounded per-adapter labels, in-flight counts, buckets, the observer."""

from __future__ import annotations

import threading
from types import SimpleNamespace

from prometheus_client import CollectorRegistry, generate_latest

from server.engine.errors import Overloaded, UnknownAdapter
from server.engine.request import FinishReason, GenerationRequest
from server.engine.scheduler import ScheduledStep
from server.metrics.adapter_usage import OTHER, AdapterUsage
from server.metrics.definitions import Metrics, count_buckets
from server.metrics.inflight import InFlight
from server.metrics.observer import MetricsObserver
from tests.metrics_scrape import parse


def _exported(usage: AdapterUsage) -> dict[str, int]:
    return {label: counts.requests for label, counts in usage.snapshot().items()}


def test_top_adapters_get_labels_and_the_rest_fold_into_other():
    usage = AdapterUsage(top=2)
    for name in ["a", "b", "c", "c", "c"]:
        usage.add_request(name)
    # a and b take the two labels; c's first request goes to OTHER, its second (2 > 1) takes a's label.
    assert _exported(usage) == {"b": 1, "c": 2, OTHER: 1}
    usage.add_generation_tokens({"c": 5, "a": 7})
    usage.add_prompt_tokens("zzz", 11)
    snapshot = usage.snapshot()
    assert snapshot["c"].generation_tokens == 5 and snapshot[OTHER].generation_tokens == 7   # a: now OTHER
    assert snapshot[OTHER].prompt_tokens == 11
    assert set(snapshot) == {"b", "c", OTHER}


def test_every_exported_series_only_grows_and_labels_stay_bounded():
    usage = AdapterUsage(top=3)
    seen: dict[str, int] = {}
    names = [f"ad{i % 7}" for i in range(50)] + ["ad6"] * 30 + [f"ad{i % 11}" for i in range(60)]
    for name in names:
        usage.add_request(name)
        now = _exported(usage)
        assert len(now) <= 4
        for label, value in now.items():
            assert value >= seen.get(label, 0), label
            seen[label] = value
        assert sum(now.values()) <= len(names)
    total = sum(c.requests for c in usage._series.values())   # exported + dropped-out series
    assert total == len(names)
    assert "ad6" in usage.snapshot()   # the most used by far keeps its own label


def test_zero_top_adapters_exports_nothing():
    usage = AdapterUsage(top=0)
    usage.add_request("a")
    usage.add_generation_tokens({"a": 3})
    assert list(usage.collect()) == []


def test_adapter_usage_exports_counters():
    registry = CollectorRegistry()
    usage = AdapterUsage(top=1)
    registry.register(usage)
    usage.add_request("x")
    usage.add_request("y")
    m = parse(generate_latest(registry).decode())
    assert m.types["deltaserve_adapter_requests"] == "counter"
    assert m.value("deltaserve_adapter_requests_total", adapter="x") == 1
    assert m.value("deltaserve_adapter_requests_total", adapter=OTHER) == 1


def test_inflight_counts_moves_and_adapter_lists():
    inflight = InFlight()
    for adapter in ["a", "b", "", "a"]:
        inflight.add(adapter, running=False)
    inflight.move("a", to_running=True)
    inflight.move("", to_running=True)
    now = inflight.snapshot()
    assert (now.running, now.waiting, now.running_adapters, now.waiting_adapters) == (2, 2, ("a",), ("a", "b"))
    inflight.remove("a", running=True)
    inflight.remove("a", running=False)
    now = inflight.snapshot()
    assert (now.running, now.waiting, now.running_adapters, now.waiting_adapters) == (1, 1, (), ("b",))


def test_count_buckets():
    assert count_buckets(64) == (0, 1, 2, 4, 8, 16, 32, 64)
    assert count_buckets(3) == (0, 1, 2, 3)
    assert count_buckets(1) == (0, 1)


def _seq(adapter: str, prompt: int = 5) -> SimpleNamespace:
    return SimpleNamespace(adapter_id=adapter, arrival=0.0, prompt_ids=[1] * prompt, output_ids=[])


def test_observer_follows_one_request_through_preemption_and_failure():
    registry = CollectorRegistry()
    metrics = Metrics.create(registry, max_batch_size=8, max_adapters=4)
    observer = MetricsObserver(metrics, AdapterUsage(top=5), lambda name: "lora")
    seq, other = _seq("a"), _seq("")
    observer.on_submit(seq)
    observer.on_submit(other)
    observer.on_schedule(ScheduledStep(prefills=[seq, other]))
    observer.on_token(seq)
    observer.on_token(other)
    observer.on_step([seq, other])
    observer.on_schedule(ScheduledStep(preempted=[seq], decodes=[other]))
    assert observer.inflight.snapshot().waiting_adapters == ("a",)
    observer.on_token(other)
    observer.on_step([other])
    observer.on_schedule(ScheduledStep(prefills=[seq]))   # recomputed: not a second queue time or prompt
    observer.on_token(seq)
    observer.on_step([seq])
    observer.on_finish(seq, FinishReason.LENGTH)
    observer.on_step_failed(RuntimeError("boom"))
    observer.on_finish(other, FinishReason.CANCELLED)
    observer.on_reject(GenerationRequest("r"), Overloaded("full"))
    observer.on_reject(GenerationRequest("s"), UnknownAdapter("nope"))
    m = parse(generate_latest(registry).decode())
    assert m.value("deltaserve_requests_total", outcome="completed", finish_reason="length") == 1
    assert m.value("deltaserve_requests_total", outcome="failed", finish_reason="cancelled") == 1
    assert m.value("deltaserve_requests_total", outcome="rejected", finish_reason="overloaded") == 1
    assert m.value("deltaserve_requests_total", outcome="rejected", finish_reason="adapter_not_found") == 1
    assert m.value("deltaserve_preemptions_total") == 1
    assert m.value("deltaserve_step_failures_total") == 1
    assert m.value("deltaserve_prompt_tokens_total") == 10
    assert m.value("deltaserve_generation_tokens_total") == 4
    assert m.value("deltaserve_request_queue_time_seconds_count", method="lora") == 1
    assert m.value("deltaserve_time_to_first_token_seconds_count", method="base") == 1
    assert m.value("deltaserve_inter_token_latency_seconds_count", method="lora") == 1
    assert m.value("deltaserve_step_batch_size_sum") == 4
    now = observer.inflight.snapshot()
    assert (now.running, now.waiting) == (0, 0)


def test_a_failing_hook_is_logged_once_and_swallowed(caplog):
    observer = MetricsObserver(Metrics.create(CollectorRegistry(), 8, 4), AdapterUsage(5), lambda name: "lora")
    for _ in range(3):
        observer.on_schedule(None)   # type: ignore[arg-type]  # AttributeError inside the hook
    assert sum("on_schedule" in r.getMessage() for r in caplog.records) == 1


def test_observer_is_safe_to_scrape_while_the_engine_thread_counts():
    usage = AdapterUsage(top=4)
    stop = threading.Event()

    def engine() -> None:
        i = 0
        while not stop.is_set():
            usage.add_request(f"a{i % 9}")
            usage.add_generation_tokens({f"a{i % 9}": 1})
            i += 1

    thread = threading.Thread(target=engine)
    thread.start()
    try:
        for _ in range(200):
            assert len(list(usage.collect())) == 3
    finally:
        stop.set()
        thread.join()


def test_residency_counts_every_tier():
    from adapters_store.versions import Tier
    from server.engine.admission import EngineStats
    from server.metrics.collectors import ModelLabels, ServerStateCollector

    tiers = [Tier.DEVICE, Tier.HOST, Tier.DISK, Tier.DISK]
    versions = {f"a{i}": SimpleNamespace(methods=("lora",), tier=tier) for i, tier in enumerate(tiers)}
    labels = ModelLabels("m", "LlamaForCausalLM", "float32", "cpu")
    stats = EngineStats(running=0, waiting=0, total_blocks=8, free_blocks=8, block_size=4, kv_usage=0.0,
                        max_batch_size=8, max_waiting=8)
    collector = ServerStateCollector(InFlight(), lambda: stats, SimpleNamespace(adapters=versions),
                                     SimpleNamespace(num_slots=2), labels)
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    for tier, count in (("device", 1), ("host", 1), ("disk", 2)):
        assert f'deltaserve_adapters_resident{{method="lora",tier="{tier}"}} {count}.0' in text
