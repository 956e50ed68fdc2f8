"""Hot-loading adapters on the default model (issue 5, acceptance 2-4), CPU figures.

Parts (all by default, memory first so that nothing else has touched the heap):
- memory:    RSS before, after loading and after unloading 500 r=8 q/v adapters (target: back within 10%);
- latency:   LoadAdapter (r=8 q/v, on disk) to the first generated token over gRPC, p50/p95 (target p50 < 100 ms);
- gap:       the longest gap between two tokens of a running stream while adapters are loaded, against its
             usual (median) gap (target < 2x); also while each new adapter is loaded and used at once;
- residency: 1,000 registered adapters with 64 on the device, traffic over all of them, against the same
             traffic with all 1,000 resident (benchmarks/hotload_residency.py); every answer compared.

    .venv/bin/python benchmarks/hotload.py [--json] [--out FILE] [--parts memory,latency,gap,residency] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import emit  # noqa: E402
from benchmarks.lora_fixtures import QV, write_peft_lora  # noqa: E402
from deltaserve.v1 import adapters_pb2 as apb  # noqa: E402
from deltaserve.v1 import adapters_pb2_grpc as apb_grpc  # noqa: E402
from deltaserve.v1 import generation_pb2 as pb  # noqa: E402
from server.app import build_stack, load  # noqa: E402
from server.config import ServerConfig  # noqa: E402
from tests.helpers import ServerThread  # noqa: E402

PROMPT = "Write a short story about a robot who learns to sing."
LATENCY_PROMPT = "Hello!"   # short, so the first token is one model step: what the load adds stands out
LATENCY_SLOTS = 16   # device slots of the latency/gap server: the first 16 placements are cold, later ones warm


def rss() -> int:
    with open(f"/proc/{os.getpid()}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def write_library(root: Path, shape: Any, count: int, prefix: str, seed: int = 0) -> list[Path]:
    return [write_peft_lora(root / f"{prefix}{i:04d}", shape, 8, QV, seed=seed + i) for i in range(count)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# --- memory -----------------------------------------------------------------------------------------

def memory(count: int) -> dict[str, Any]:
    """Loads then unloads `count` adapters through the admin manager; RSS at each point."""
    loaded = load(ServerConfig())
    root = Path(tempfile.mkdtemp(prefix="hotload-memory-"))
    paths = write_library(root, loaded.shape, count, "m")
    stack = build_stack(loaded, ServerConfig(adapters_load_root=str(root), max_host_adapters=count + 1,
                                             kv_cache_tokens=4096))
    manager = stack.adapters.manager
    gc.collect()
    start = rss()
    began = time.perf_counter()
    for path in paths:
        manager.load(path.name, str(path))
    load_s = time.perf_counter() - began
    peak = rss()
    adapter_bytes = manager.get(paths[0].name).nbytes
    for path in paths:
        manager.unload(path.name)
    gc.collect()
    time.sleep(0.5)  # the registry gives freed heap back to the OS on a timer, shortly after unloads
    end = rss()
    stack.adapters.stop()
    held = stack.store.host.nbytes
    return {"adapters": count, "adapter_bytes": adapter_bytes,
            "rss_start_mib": start / 2**20, "rss_loaded_mib": peak / 2**20, "rss_unloaded_mib": end / 2**20,
            "end_over_start": end / start, "growth_returned": (peak - end) / max(1, peak - start),
            "host_bytes_after": held, "load_seconds_each": load_s / count}


# --- latency and gaps over gRPC -----------------------------------------------------------------------

def first_token_after_load(server: ServerThread, admin: apb_grpc.AdaptersStub, path: Path) -> dict[str, float]:
    start = time.perf_counter()
    admin.LoadAdapter(apb.LoadAdapterRequest(name=path.name, path=str(path)))
    loaded = time.perf_counter()
    request = pb.GenerateRequest(text=LATENCY_PROMPT, adapter_id=path.name,
                                 stopping=pb.StoppingCriteria(max_new_tokens=1, ignore_eos=True))
    for event in server.stub.GenerateStream(request):
        if event.HasField("token"):
            break
    first = time.perf_counter()
    return {"load_ms": (loaded - start) * 1000, "first_token_ms": (first - start) * 1000}


def _summary(runs: list[dict[str, float]]) -> dict[str, float]:
    total = [r["first_token_ms"] for r in runs]
    loads = [r["load_ms"] for r in runs]
    return {"n": len(runs), "p50_ms": statistics.median(total), "p95_ms": percentile(total, 0.95),
            "max_ms": max(total), "load_rpc_p50_ms": statistics.median(loads),
            "load_rpc_p95_ms": percentile(loads, 0.95)}


def latency(server: ServerThread, paths: list[Path], slots: int) -> dict[str, Any]:
    """The first `slots` loads each go to a slot never written before ("cold": the kernel maps its pages on that
    first write); later ones reuse a slot evicted from an idle adapter ("warm", the steady state)."""
    admin = apb_grpc.AdaptersStub(server.channel)
    base = []
    for _ in range(10):  # the same request on the base model: what any first token costs here
        start = time.perf_counter()
        next(iter(server.stub.GenerateStream(pb.GenerateRequest(text=LATENCY_PROMPT, stopping=pb.StoppingCriteria(
            max_new_tokens=1)))))
        base.append((time.perf_counter() - start) * 1000)
    runs = [first_token_after_load(server, admin, path) for path in paths]
    return {"all": _summary(runs[1:]), "cold_slot": _summary(runs[1:slots]), "warm_slot": _summary(runs[slots:]),
            "base_first_token_p50_ms": statistics.median(base)}


class StreamClock:
    """A long stream whose token arrival times are recorded by a background reader."""

    def __init__(self, server: ServerThread, tokens: int, prompt: str = PROMPT) -> None:
        request = pb.GenerateRequest(text=prompt, stopping=pb.StoppingCriteria(max_new_tokens=tokens,
                                                                               ignore_eos=True))
        self.call = server.stub.GenerateStream(request)
        self.times: list[float] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for event in self.call:
                if event.HasField("token"):
                    self.times.append(time.perf_counter())
        except grpc.RpcError:  # cancelled at the end of the measurement
            pass

    def gaps_between(self, start: float, end: float) -> list[float]:
        times = [t for t in self.times if start <= t <= end]
        return [(b - a) * 1000 for a, b in zip(times, times[1:], strict=False)]


def _load_loop(admin: apb_grpc.AdaptersStub, server: ServerThread, paths: list[Path], use: bool, seconds: float,
               every: float) -> int:
    """Loads the adapters one after another, one every `every` seconds (0: back to back), again as new versions
    until `seconds` have passed; with `use`, each one also serves a one-token request right after its load.
    Returns how many loads it made."""
    loads, start = 0, time.perf_counter()
    while (now := time.perf_counter()) < start + seconds:
        if every:
            time.sleep(max(0.0, start + loads * every - now))
        path = paths[loads % len(paths)]
        admin.LoadAdapter(apb.LoadAdapterRequest(name=path.name, path=str(path)))
        loads += 1
        if use:
            server.stub.Generate(pb.GenerateRequest(text="Hi", adapter_id=path.name,
                                                    stopping=pb.StoppingCriteria(max_new_tokens=1)))
    return loads


# (name, load every N seconds (0 = back to back), serve a request on each new adapter at once)
GAP_PHASES = (("quiet", None, False), ("loading_10_per_s", 0.1, False), ("loading_back_to_back", 0.0, False),
              ("loading_and_first_use_5_per_s", 0.2, True))


def gaps(server: ServerThread, paths: list[Path], seconds: float) -> dict[str, Any]:
    admin = apb_grpc.AdaptersStub(server.channel)
    clock = StreamClock(server, tokens=4000)
    while len(clock.times) < 20:
        time.sleep(0.01)
    phases: dict[str, list[float]] = {}
    loads: dict[str, int] = {}
    for name, every, use in GAP_PHASES:
        start = time.perf_counter()
        if every is None:
            time.sleep(seconds)
        else:
            loads[name] = _load_loop(admin, server, paths, use, seconds, every)
        phases[name] = clock.gaps_between(start, time.perf_counter())
    clock.call.cancel()
    usual = statistics.median(phases["quiet"])
    result: dict[str, Any] = {"usual_gap_ms": usual}
    for name, values in phases.items():
        result[name] = {"tokens": len(values) + 1, "loads": loads.get(name, 0),
                        "median_ms": statistics.median(values), "p99_ms": percentile(values, 0.99),
                        "max_ms": max(values), "max_over_usual": max(values) / usual}
    return result


def served(parts: set[str], count: int, seconds: float) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="hotload-library-"))
    results: dict[str, Any] = {}
    with ServerThread(model="default", adapters_load_root=str(root), max_device_adapters=LATENCY_SLOTS,
                      max_host_adapters=256, kv_cache_tokens=16384) as server:
        shape = server.running.stack.loaded.shape
        if "latency" in parts:
            paths = write_library(root, shape, LATENCY_SLOTS + count, "l")
            results["latency"] = latency(server, paths, LATENCY_SLOTS)
        if "gap" in parts:
            results["gap"] = gaps(server, write_library(root, shape, 2 * count, "g", seed=10_000), seconds)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--parts", default="memory,latency,gap,residency")
    parser.add_argument("--quick", action="store_true", help="fewer adapters and requests (a smoke run)")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    results: dict[str, Any] = {"cpu_threads": os.cpu_count()}
    if "memory" in parts:
        results["memory"] = memory(50 if args.quick else 500)
    if parts & {"latency", "gap"}:
        results.update(served(parts, 10 if args.quick else 40, 2.0 if args.quick else 4.0))
    if "residency" in parts:
        from benchmarks.hotload_residency import residency

        results["residency"] = residency(100 if args.quick else 1000, 64, 64 if args.quick else 512)
    emit(results, args.json, args.out)
    if not args.json:
        print_summary(results)


def print_summary(r: dict[str, Any]) -> None:
    if "memory" in r:
        m = r["memory"]
        print(f"memory: {m['adapters']} adapters: RSS {m['rss_start_mib']:.0f} -> {m['rss_loaded_mib']:.0f} -> "
              f"{m['rss_unloaded_mib']:.0f} MiB (end/start {m['end_over_start']:.3f}, "
              f"{100 * m['growth_returned']:.0f}% of the growth returned)")
    if "latency" in r:
        lat = r["latency"]
        for name in ("all", "warm_slot", "cold_slot"):
            s = lat[name]
            print(f"LoadAdapter -> first token, {name} ({s['n']}): p50 {s['p50_ms']:.1f} ms, p95 {s['p95_ms']:.1f} ms"
                  f" (load RPC p50 {s['load_rpc_p50_ms']:.1f} ms)")
        print(f"   the base model's first token alone: p50 {lat['base_first_token_p50_ms']:.1f} ms")
    if "gap" in r:
        g = r["gap"]
        for name, _, _ in GAP_PHASES:
            print(f"gap {name}: max {g[name]['max_ms']:.1f} ms = {g[name]['max_over_usual']:.2f}x the usual "
                  f"{g['usual_gap_ms']:.1f} ms (p99 {g[name]['p99_ms']:.1f} ms, {g[name]['tokens']} tokens)")
    if "residency" in r:
        res = r["residency"]
        print(f"residency: {res['registered']} registered / {res['device']} on device: {res['tiered_tok_s']:.0f} "
              f"tok/s vs all resident {res['resident_tok_s']:.0f} tok/s = {res['ratio']:.3f}; "
              f"{res['mismatches']} mismatches in {res['requests']} answers")


if __name__ == "__main__":
    main()
