"""Metrics end to end: a real server on the tiny model, a known workload, the scraped /metrics equal to it."""

from __future__ import annotations

import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from transformers import AutoConfig

from benchmarks.lora_fixtures import QV, write_peft_lora
from deltaserve.v1 import generation_pb2 as pb
from server.model.shape import ModelShape
from tests.helpers import ServerThread
from tests.metrics_scrape import Scrape, scrape

ADAPTERS = ("a0", "a1", "a2")
NEW_TOKENS = 8
PROMPTS = ["Hello there", "The quick brown fox", "1 2 3 4 5", "Why is the sky blue?", "Once upon a time",
           "a", "Paris is", "def main():", "Roses are red", "The answer is"]


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """a0..a2 used by the workload, a3 registered but never used, two that are refused."""
    shape = ModelShape.from_hf_config(AutoConfig.from_pretrained(tiny_model_dir))
    root = tmp_path_factory.mktemp("metrics-adapters")
    for seed, name in enumerate((*ADAPTERS, "a3")):
        write_peft_lora(root / name, shape, rank=4, targets=QV, seed=seed)
    write_peft_lora(root / "too-large", shape, rank=16, targets=QV, seed=9)   # above --max-lora-rank 8
    broken = write_peft_lora(root / "broken", shape, rank=4, targets=QV, seed=10)
    (broken / "adapter_model.safetensors").unlink()
    return root


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path, cache_dir: str, adapters_dir: Path) -> ServerThread:
    with ServerThread(model=str(tiny_model_dir), cache_dir=cache_dir, device="cpu", adapters_dir=str(adapters_dir),
                      max_device_adapters=4, max_lora_rank=8, kv_cache_tokens=4096) as running:
        yield running


def _request(prompt: str, adapter: str = "", max_new_tokens: int = NEW_TOKENS) -> pb.GenerateRequest:
    return pb.GenerateRequest(text=prompt, adapter_id=adapter,
                              stopping=pb.StoppingCriteria(max_new_tokens=max_new_tokens, ignore_eos=True))


def _settled(served: ServerThread, tokens: float) -> Scrape:
    """A scrape once the engine has recorded its last step (step stats land just after the last output)."""
    deadline = time.monotonic() + 10
    while True:
        now = scrape(served.metrics_url)
        if now.value("deltaserve_step_batch_size_sum") >= tokens or time.monotonic() > deadline:
            return now
        time.sleep(0.02)


def test_known_workload_is_counted_exactly(served):
    adapters = [ADAPTERS[i % 3] for i in range(len(PROMPTS))]             # a0 x4, a1 x3, a2 x3
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        responses = list(pool.map(lambda pa: served.stub.Generate(_request(*pa)), zip(PROMPTS, adapters,
                                                                                        strict=True)))
    with pytest.raises(grpc.RpcError) as error:
        served.stub.Generate(_request("hi", "no-such-adapter"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert all(len(r.token_ids) == NEW_TOKENS for r in responses)
    n, tokens = len(responses), len(responses) * NEW_TOKENS
    prompt_tokens = {a: sum(r.prompt_tokens for r, ra in zip(responses, adapters, strict=True) if ra == a)
                     for a in ADAPTERS}
    m = _settled(served, tokens)

    # Requests and tokens (the warm-up request is not counted).
    assert m.value("deltaserve_requests_total", outcome="completed", finish_reason="length") == n
    assert m.value("deltaserve_requests_total", outcome="rejected", finish_reason="adapter_not_found") == 1
    assert m.total("deltaserve_requests_total") == n + 1
    assert m.value("deltaserve_generation_tokens_total") == tokens
    assert m.value("deltaserve_prompt_tokens_total") == sum(prompt_tokens.values())
    # Latency histograms: one TTFT, queue time and e2e per request, one gap per later token; all LoRA.
    for name, count in (("time_to_first_token_seconds", n), ("request_queue_time_seconds", n),
                        ("e2e_request_latency_seconds", n), ("inter_token_latency_seconds", n * (NEW_TOKENS - 1))):
        assert m.value(f"deltaserve_{name}_count", method="lora") == count, name
        assert m.value(f"deltaserve_{name}_count", method="base") == 0, name
        assert m.value(f"deltaserve_{name}_bucket", method="lora", le="+Inf") == count, name
        assert m.types[f"deltaserve_{name}"] == "histogram"
    # Steps: every step gives each of its sequences one token.
    steps = m.value("deltaserve_step_batch_size_count")
    assert m.value("deltaserve_step_batch_size_sum") == tokens
    assert m.value("deltaserve_step_distinct_adapters_count") == steps
    assert m.value("deltaserve_step_duration_seconds_count") == steps
    assert steps <= tokens and m.value("deltaserve_step_distinct_adapters_sum") <= 3 * steps
    assert m.value("deltaserve_preemptions_total") == 0
    # Per-adapter counters (all three fit in the top 50).
    for adapter, count in zip(ADAPTERS, (4, 3, 3), strict=True):
        assert m.value("deltaserve_adapter_requests_total", adapter=adapter) == count
        assert m.value("deltaserve_adapter_generation_tokens_total", adapter=adapter) == count * NEW_TOKENS
        assert m.value("deltaserve_adapter_prompt_tokens_total", adapter=adapter) == prompt_tokens[adapter]
    assert m.value("deltaserve_adapter_requests_total", adapter="__other__") == 0
    # Nothing in flight any more.
    assert m.value("deltaserve_requests_running") == m.value("deltaserve_requests_waiting") == 0
    assert m.value("deltaserve_kv_cache_usage_ratio") == 0


def test_adapter_registry_residency_and_loads(served):
    for adapter in ADAPTERS:   # adapters are placed in slots at admission and stay while slots are free
        served.stub.Generate(_request("Hi", adapter, max_new_tokens=1))
    m = scrape(served.metrics_url)
    assert m.value("deltaserve_adapters_registered", method="lora") == 4
    assert m.value("deltaserve_adapters_resident", method="lora", tier="device") == 3
    assert m.value("deltaserve_adapters_resident", method="lora", tier="host") == 1
    assert m.value("deltaserve_adapters_resident", method="lora", tier="disk") == 0
    assert m.value("deltaserve_adapter_device_slots") == 4
    assert m.value("deltaserve_adapter_load_duration_seconds_count", method="lora") == 5   # a0..a3, too-large
    assert m.value("deltaserve_adapter_load_failures_total", reason="missing_weights") == 1
    assert m.value("deltaserve_adapter_load_failures_total", reason="delta_rejected") == 1
    assert m.total("deltaserve_adapter_load_failures_total") == 2
    assert m.value("deltaserve_model_info", model=served.running.stack.loaded.model_id, architecture="LlamaForCausalLM",
                   dtype="float32", device="cpu") == 1


def test_in_flight_gauges_and_cancellation(served):
    before = scrape(served.metrics_url)
    stream = served.stub.GenerateStream(_request("Count to a thousand", "a1", max_new_tokens=400))
    next(stream)
    during = scrape(served.metrics_url)
    stream.cancel()
    assert during.value("deltaserve_requests_running") == 1
    [info] = during.labels_of("deltaserve_lora_requests_info")
    assert info == {"running_lora_adapters": "a1", "waiting_lora_adapters": "", "max_lora": "4"}
    assert abs(during.value("deltaserve_lora_requests_info", **info) - time.time()) < 60
    assert during.value("deltaserve_kv_cache_usage_ratio") > 0
    deadline = time.monotonic() + 10
    while scrape(served.metrics_url).value("deltaserve_requests_running") and time.monotonic() < deadline:
        time.sleep(0.02)
    after = scrape(served.metrics_url)
    cancelled = dict(outcome="cancelled", finish_reason="cancelled")
    assert after.value("deltaserve_requests_total", **cancelled) == before.value("deltaserve_requests_total",
                                                                                  **cancelled) + 1
    assert after.value("deltaserve_kv_cache_usage_ratio") == 0
    [info] = after.labels_of("deltaserve_lora_requests_info")
    assert info["running_lora_adapters"] == ""
    assert "vllm:lora_requests_info" not in after.text   # only with --metrics-vllm-compat


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed")
def test_promtool_check_metrics_reports_nothing(served):
    text = scrape(served.metrics_url).text
    checked = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True,
                             timeout=60)
    assert checked.returncode == 0 and not (checked.stdout + checked.stderr).strip(), checked.stdout + checked.stderr


def test_vllm_compatible_names_and_no_per_adapter_labels(tiny_model_dir, cache_dir, adapters_dir):
    with ServerThread(model=str(tiny_model_dir), cache_dir=cache_dir, device="cpu", adapters_dir=str(adapters_dir),
                      max_device_adapters=4, max_lora_rank=8, kv_cache_tokens=4096, metrics_vllm_compat=True,
                      metrics_top_adapters=0, warmup=False) as running:
        running.stub.Generate(_request("Hello", "a2"))
        m = scrape(running.metrics_url)
    for name in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                 "vllm:gpu_cache_usage_perc"):
        assert m.value(name) == 0 and m.types[name] == "gauge"
    assert m.labels_of("vllm:lora_requests_info") == m.labels_of("deltaserve_lora_requests_info")
    assert m.labels_of("vllm:cache_config_info") == [{"block_size": "16", "num_gpu_blocks": str(4096 // 16)}]
    assert not m.labels_of("deltaserve_adapter_requests_total")
    assert m.value("deltaserve_requests_total", outcome="completed", finish_reason="length") == 1
    if shutil.which("promtool"):
        checked = subprocess.run(["promtool", "check", "metrics"], input=m.text, capture_output=True, text=True)
        complaints = [line for line in (checked.stdout + checked.stderr).splitlines() if line.strip()]
        assert complaints and all("should not contain ':'" in line for line in complaints), complaints


def test_metrics_port_minus_one_serves_no_endpoint(tiny_model_dir, cache_dir):
    with ServerThread(model=str(tiny_model_dir), cache_dir=cache_dir, device="cpu", metrics_port=-1,
                      warmup=False) as running:
        assert running.running.metrics is None
        assert running.stub.Generate(_request("Hello")).token_ids


def test_metrics_flags_have_env_twins(monkeypatch):
    from server.cli import build_parser
    from server.config import ServerConfig, config_from_args

    monkeypatch.setenv("DELTASERVE_METRICS_PORT", "9555")
    monkeypatch.setenv("DELTASERVE_METRICS_TOP_ADAPTERS", "7")
    config = config_from_args(build_parser().parse_args(["serve", "--metrics-host", "127.0.0.1"]))
    assert (config.metrics_port, config.metrics_top_adapters, config.metrics_host) == (9555, 7, "127.0.0.1")
    assert ServerConfig().metrics_port == 9400
    for bad in ({"metrics_port": -2}, {"metrics_port": 70000}, {"metrics_top_adapters": -1}):
        with pytest.raises(ValueError):
            ServerConfig(**bad)
