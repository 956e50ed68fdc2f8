"""1,000 registered adapters with 64 on the device vs all resident, on the default model (issue 5, acceptance 2).

Two servers' stacks in one process, each on its own instance of the model: one with 64 device slots, a 256-adapter
host tier and the disk beyond it; one with every adapter in its own slot (all placed before the clock starts).
Each round draws requests uniformly over all adapters and runs them on both, alternating; throughput is
generated tokens over wall time (prefills included). Every answer of the tiered stack is compared with the
all-resident one's, and a sample with a fresh engine serving that adapter alone.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from adapters_store.events import StoreListener
from adapters_store.types import AdapterWeights
from benchmarks.common import PROMPTS
from benchmarks.lora_fixtures import QV, write_peft_lora
from server.app import ServingStack, build_stack, load
from server.config import ServerConfig
from server.engine.request import GenerationRequest
from tests.hotload_helpers import detach_deltas, offline_tokens, submit_all


class LoadCounter(StoreListener):
    """Counts successful reads of adapter files (the scan, then every read back from disk)."""

    def __init__(self) -> None:
        self.loads = 0

    def on_load(self, weights: AdapterWeights, seconds: float) -> None:
        self.loads += 1


def _stack(root: Path, device: int, host: int) -> tuple[ServingStack, LoadCounter, float]:
    counter = LoadCounter()
    config = ServerConfig(adapters_dir=str(root), max_device_adapters=device, max_host_adapters=host,
                          max_lora_rank=8, max_prefix_tokens=1, max_batch_size=64, kv_cache_tokens=16384,
                          adapters_poll_interval=0)
    began = time.perf_counter()
    stack = build_stack(load(config), config, counter)
    stack.engine.start()
    return stack, counter, time.perf_counter() - began


def _timed(stack: ServingStack, requests: list[GenerationRequest]) -> tuple[float, dict[str, list[int]]]:
    start = time.perf_counter()
    results = submit_all(stack.engine, requests, timeout=3600)
    wall = time.perf_counter() - start
    failed = [r for r in results.values() if isinstance(r, Exception)]
    assert not failed, failed[:3]
    tokens = {rid: r.token_ids for rid, r in results.items()}
    return sum(len(t) for t in tokens.values()) / wall, tokens


def residency(registered: int, device: int, count: int, new_tokens: int = 32, host: int = 256,
              rounds: int = 2) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="hotload-residency-"))
    shape = load(ServerConfig()).shape
    for i in range(registered):
        write_peft_lora(root / f"r{i:04d}", shape, 8, QV, seed=i, alpha=64.0)
    tiered, reads, tiered_scan = _stack(root, device, host)
    resident, _, resident_scan = _stack(root, registered, registered)
    submit_all(resident.engine, [GenerationRequest(f"warm-{n}", prompt="Hi", adapter_id=n, max_new_tokens=1)
                                 for n in resident.store.names()], timeout=3600)
    rng = random.Random(0)
    speeds: dict[str, list[float]] = {"tiered": [], "resident": []}
    mismatches, scanned, requests = 0, reads.loads, []
    try:
        for r in range(rounds):
            requests = [GenerationRequest(f"q{r}-{i}", prompt=PROMPTS[i % len(PROMPTS)], max_new_tokens=new_tokens,
                                          ignore_eos=True, adapter_id=f"r{rng.randrange(registered):04d}")
                        for i in range(count)]
            tok_s, tiered_tokens = _timed(tiered, requests)
            speeds["tiered"].append(tok_s)
            tok_s, resident_tokens = _timed(resident, requests)
            speeds["resident"].append(tok_s)
            mismatches += sum(tiered_tokens[q.request_id] != resident_tokens[q.request_id] for q in requests)
    finally:
        for stack in (tiered, resident):
            stack.engine.shutdown(0)
            stack.adapters.stop()
            detach_deltas(stack.loaded)
    sample = rng.sample(requests, 8)
    fresh = sum(offline_tokens(tiered.loaded, root / q.adapter_id, [q.prompt], new_tokens)[0] ==
                tiered_tokens[q.request_id] for q in sample)
    best = {name: max(values) for name, values in speeds.items()}
    return {"registered": registered, "device": device, "host": host, "requests_per_round": count,
            "rounds": rounds, "new_tokens": new_tokens, "tiered_tok_s": best["tiered"],
            "resident_tok_s": best["resident"], "ratio": best["tiered"] / best["resident"],
            "ratio_of_medians": statistics.median(speeds["tiered"]) / statistics.median(speeds["resident"]),
            "runs_tok_s": speeds, "mismatches": mismatches, "requests": count * rounds,
            "fresh_engine_sample_equal": f"{fresh}/{len(sample)}", "reads_from_disk": reads.loads - scanned,
            "scan_s": {"tiered": tiered_scan, "resident": resident_scan}}
