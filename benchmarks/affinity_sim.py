"""Adapter-affinity routing (Ray Serve's multiplexed routing) against round-robin over N replicas with bounded
adapter slots: a discrete-event simulation, no Ray needed.

Each replica holds at most `slots` adapters (an LRU: Ray's `max_num_models_per_replica`); a request whose adapter
is not resident on the replica it lands on loads it (evicting the least recently used). Requests arrive as a Poisson
stream at `utilization` of the cluster's capacity (`max_ongoing` concurrent requests per replica, each taking
`service` time, plus `load_cost` when it had to load its adapter); adapter popularity is Zipf(`zipf`).

Policies:
- affinity: Ray 2.60's PowerOfTwoChoicesRequestRouter with a multiplexed model id (request_router.py,
  pow_2_router.py): among the replicas holding the adapter, the less busy of two random ones, if it has room
  (ongoing < max_ongoing); else, among the replicas with the fewest adapters, the same; else among all.
- round-robin: request i goes to replica i mod N.
- power of two (no id): what Ray does for a request without a model id: the less busy of two random replicas.

    .venv/bin/python benchmarks/affinity_sim.py --json docs/affinity_sim.json --plot docs/affinity_sim.png
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import sys
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

POLICIES = ("affinity", "round-robin", "power-of-two")


@dataclass(frozen=True)
class SimConfig:
    """One simulated cluster and workload."""

    adapters: int = 10_000
    zipf: float = 1.0
    replicas: int = 8
    slots: int = 32
    requests: int = 100_000
    warmup: int = 20_000          # requests before counting starts (caches fill)
    max_ongoing: int = 32
    service: float = 1.0
    load_cost: float = 0.5
    utilization: float = 0.7
    seed: int = 0


@dataclass
class Replica:
    """An adapter LRU and the requests in flight."""

    lru: OrderedDict[int, None]
    ongoing: int = 0
    served: int = 0
    loads: int = 0


class Cluster:
    """The replicas and, as Ray's routers see it, which replicas hold each adapter."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.replicas = [Replica(OrderedDict()) for _ in range(config.replicas)]
        self.holders: dict[int, set[int]] = {}
        self.rng = random.Random(config.seed)
        self.next_rr = 0

    def two_choices(self, candidates: list[int]) -> int:
        if len(candidates) == 1:
            return candidates[0]
        a, b = self.rng.sample(candidates, 2)
        return a if self.replicas[a].ongoing <= self.replicas[b].ongoing else b

    def has_room(self, index: int) -> bool:
        return self.replicas[index].ongoing < self.config.max_ongoing

    def fewest_adapters(self) -> list[int]:
        least = min(len(r.lru) for r in self.replicas)
        return [i for i, r in enumerate(self.replicas) if len(r.lru) == least]

    def route(self, policy: str, adapter: int) -> int:
        everyone = list(range(len(self.replicas)))
        if policy == "round-robin":
            self.next_rr = (self.next_rr + 1) % len(self.replicas)
            return self.next_rr
        tiers = [sorted(self.holders.get(adapter, ())), self.fewest_adapters(), everyone]
        if policy == "power-of-two":
            tiers = [everyone]
        for candidates in tiers:
            if candidates:
                chosen = self.two_choices(candidates)
                if self.has_room(chosen):
                    return chosen
        return min(everyone, key=lambda i: self.replicas[i].ongoing)   # all full: the router backs off, then this

    def serve(self, index: int, adapter: int, counted: bool) -> bool:
        """Runs a request on replica `index`; True when it had to load the adapter."""
        replica = self.replicas[index]
        replica.ongoing += 1
        if counted:
            replica.served += 1
        if adapter in replica.lru:
            replica.lru.move_to_end(adapter)
            return False
        if len(replica.lru) >= self.config.slots:
            evicted, _ = replica.lru.popitem(last=False)
            self.holders[evicted].discard(index)
        replica.lru[adapter] = None
        self.holders.setdefault(adapter, set()).add(index)
        if counted:
            replica.loads += 1
        return True


def workload(config: SimConfig) -> tuple[np.ndarray, np.ndarray]:
    """Arrival times and adapter ids (Zipf popularity, adapter 0 the most popular)."""
    rng = np.random.default_rng(config.seed)
    weights = 1.0 / np.arange(1, config.adapters + 1) ** config.zipf
    adapters = rng.choice(config.adapters, size=config.requests, p=weights / weights.sum())
    rate = config.utilization * config.replicas * config.max_ongoing / config.service
    return np.cumsum(rng.exponential(1.0 / rate, size=config.requests)), adapters


def simulate(config: SimConfig, policy: str) -> dict[str, float]:
    """Load rate, resident-hit rate and balance (max/mean requests per replica) after the warm-up."""
    cluster = Cluster(config)
    finishing: list[tuple[float, int]] = []
    times, adapters = workload(config)
    loads = counted = 0
    for i, (now, adapter) in enumerate(zip(times.tolist(), adapters.tolist(), strict=True)):
        while finishing and finishing[0][0] <= now:
            cluster.replicas[heapq.heappop(finishing)[1]].ongoing -= 1
        index = cluster.route(policy, adapter)
        counting = i >= config.warmup
        loaded = cluster.serve(index, adapter, counting)
        heapq.heappush(finishing, (now + config.service + (config.load_cost if loaded else 0.0), index))
        loads += loaded and counting
        counted += counting
    served = [r.served for r in cluster.replicas]
    return {"load_rate": loads / counted, "hit_rate": 1 - loads / counted,
            "balance": max(served) / (sum(served) / len(served))}


def run(base: SimConfig, replica_counts: list[int]) -> list[dict[str, object]]:
    rows = []
    for replicas in replica_counts:
        config = replace(base, replicas=replicas, seed=base.seed + replicas)
        for policy in POLICIES:
            rows.append({"replicas": replicas, "policy": policy, **simulate(config, policy)})
            print(f"{replicas:>3} replicas {policy:<13} load rate {rows[-1]['load_rate']:.3f}  "
                  f"hit rate {rows[-1]['hit_rate']:.3f}  max/mean {rows[-1]['balance']:.3f}", flush=True)
    return rows


def table(rows: list[dict[str, object]]) -> str:
    lines = ["| replicas | routing | adapter loads per request | resident-hit rate | max/mean requests per replica |",
             "|---:|---|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['replicas']} | {row['policy']} | {row['load_rate']:.3f} | {row['hit_rate']:.3f} | "
                     f"{row['balance']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for field, default in asdict(SimConfig()).items():
        parser.add_argument("--" + field.replace("_", "-"), type=type(default), default=default)
    parser.add_argument("--replica-counts", default="8,16,64")
    parser.add_argument("--json", help="write the rows and the configuration here")
    parser.add_argument("--plot", help="write a PNG plot here")
    args = parser.parse_args(argv)
    base = SimConfig(**{field: getattr(args, field) for field in asdict(SimConfig())})
    rows = run(base, [int(n) for n in args.replica_counts.split(",")])
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"config": asdict(base), "rows": rows}, indent=1) + "\n")
    if args.plot:
        from benchmarks.affinity_plot import plot

        plot(rows, base, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
