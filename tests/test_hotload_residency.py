"""Residency on the tiny model: 200 registered adapters served through 4 device slots and a 16-adapter host tier
(every answer equal to a fresh engine's), and memory given back after load/unload cycles."""

from __future__ import annotations

import gc
import os
import time

import pytest

from adapters_store.events import StoreListener
from adapters_store.types import AdapterWeights
from server.app import build_stack
from server.config import ServerConfig
from server.model.loader import load_model
from tests.hotload_helpers import PROMPTS, detach_deltas, offline_tokens, request, submit_all, write_adapter

MANY = 200
TOKENS = 8


class CountingListener(StoreListener):
    """Counts successful reads of adapter files (the scan, then every read back from disk)."""

    def __init__(self) -> None:
        self.loads = 0

    def on_load(self, weights: AdapterWeights, seconds: float) -> None:
        self.loads += 1


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, cache_dir):
    loaded = load_model(str(tiny_model_dir), cache_dir, "cpu", "float32")
    yield loaded
    detach_deltas(loaded)


@pytest.fixture(scope="module")
def offline(tiny_model_dir, cache_dir):
    return load_model(str(tiny_model_dir), cache_dir, "cpu", "float32")


def test_many_adapters_few_slots_every_answer_correct(tiny, offline, tmp_path):
    root = tmp_path / "adapters"
    for i in range(MANY):
        write_adapter(root / f"m{i:03d}", tiny.shape, seed=i, rank=2)
    listener = CountingListener()
    config = ServerConfig(adapters_dir=str(root), max_device_adapters=4, max_host_adapters=16, kv_cache_tokens=8192,
                          block_size=8, max_batch_size=32, adapters_poll_interval=0)
    stack = build_stack(tiny, config, listener)
    stack.engine.start()
    try:
        # Every adapter twice, interleaved so that no two neighbours share one: the slots must keep turning over.
        requests = [request(f"q{i}", PROMPTS[(i // MANY) % 2], f"m{(i * 37) % MANY:03d}", TOKENS)
                    for i in range(2 * MANY)]
        results = submit_all(stack.engine, requests, timeout=600)
        by_adapter = {}
        for req in requests:
            by_adapter.setdefault(req.adapter_id, set()).add(req.prompt)
        expected = {}
        for name, prompts in by_adapter.items():
            ordered = sorted(prompts)
            for prompt, tokens in zip(ordered, offline_tokens(offline, root / name, ordered, TOKENS), strict=True):
                expected[(name, prompt)] = tokens
        for req in requests:
            result = results[req.request_id]
            assert not isinstance(result, Exception), f"{req.request_id}: {result!r}"
            assert result.token_ids == expected[(req.adapter_id, req.prompt)], req.request_id
        assert listener.loads > MANY               # adapters dropped from host memory were read back from disk
        assert len(stack.store.host) <= 16 + 4     # the host tier held to its limit (+ those wanted right then)
        assert len(stack.slots.resident()) <= 4
    finally:
        stack.engine.shutdown(0)
        stack.adapters.stop()
        detach_deltas(tiny)


def _rss() -> int:
    with open(f"/proc/{os.getpid()}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads /proc")
def test_memory_returns_after_load_unload_cycles(tiny, tmp_path):
    library = tmp_path / "library"
    count = 120
    for i in range(count):
        write_adapter(library / f"x{i:03d}", tiny.shape, seed=i, rank=64)   # 0.5 MiB each
    config = ServerConfig(adapters_load_root=str(library), kv_cache_tokens=1024, block_size=8,
                          max_host_adapters=1024)
    stack = build_stack(tiny, config)
    manager = stack.adapters.manager

    def cycle() -> tuple[int, int]:
        for i in range(count):
            manager.load(f"x{i:03d}", str(library / f"x{i:03d}"))
        peak = _rss()
        for i in range(count):
            manager.unload(f"x{i:03d}")
        gc.collect()
        time.sleep(0.3)
        stack.store.memory.trim_now()
        return peak, _rss()

    try:
        cycle()  # the first cycle warms allocator and caches up
        start = _rss()
        peaks, ends = zip(*(cycle() for _ in range(3)), strict=True)
        grown = max(peaks) - start
        assert grown > 0.7 * count * 2**19, f"the adapters should have taken memory: {grown / 2**20:.1f} MiB"
        for end in ends:
            assert end - start < 0.1 * grown, f"{(end - start) / 2**20:.1f} MiB of {grown / 2**20:.1f} MiB kept"
        assert len(stack.store.host) == 0 and stack.store.host.nbytes == 0
    finally:
        stack.adapters.stop()
        detach_deltas(tiny)
