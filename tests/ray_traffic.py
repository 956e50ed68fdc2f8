"""Traffic for the Ray Serve tests: the request mix, its answers from the single-node server (the reference), the
same requests over gRPC (through Ray's proxy) and HTTP (the openai client), and per-replica counts."""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clients.client import DeltaClient
from tests.openai_fixtures import MODEL_ID, write_adapters

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = ["shout", "cheer", "pirate", "json", "lora", "prefix"]   # LoRA, prefix, bottleneck, MAM; PEFT and native
PROMPTS = ["What is a forest?", "Why is salt useful?"]
NEW_TOKENS = 8
LONG_TOKENS = 24


@dataclass(frozen=True)
class Ask:
    """One request, as both protocols send it: chat messages, greedy, a fixed length."""

    adapter: str
    prompt: str
    tokens: int = NEW_TOKENS

    def grpc(self, client: DeltaClient) -> str:
        return client.generate(messages=[{"role": "user", "content": self.prompt}], adapter=self.adapter,
                               max_new_tokens=self.tokens, ignore_eos=True).text

    def http(self, openai: Any) -> str:
        reply = openai.chat.completions.create(
            model=self.adapter or MODEL_ID, messages=[{"role": "user", "content": self.prompt}],
            max_tokens=self.tokens, temperature=0, extra_body={"ignore_eos": True})
        return reply.choices[0].message.content


def make_store(root: Path, model_dir: Path) -> Path:
    """Six adapters: the four examples and two written for the default model (a PEFT LoRA, a PEFT prefix)."""
    for name in ("shout", "cheer", "pirate", "json"):
        shutil.copytree(ROOT / "examples" / "adapters" / name, root / name)
    write_adapters(root, model_dir)
    return root


def mix() -> list[Ask]:
    return [Ask(adapter, prompt) for adapter in ["", *ADAPTERS] for prompt in PROMPTS]


def openai_client(http_url: str, api_key: str | None = None) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=http_url + "/v1", api_key=api_key or "unused", max_retries=0, timeout=300)


def answers(asks: list[Ask], grpc_target: str, http_url: str, ray: bool = False, api_key: str | None = None,
            workers: int = 16) -> tuple[list[str], list[str]]:
    """Every request over gRPC and over HTTP, all in flight together: (gRPC texts, HTTP texts)."""
    openai = openai_client(http_url, api_key)
    with DeltaClient(grpc_target, timeout=300, ray=ray, api_key=api_key) as client, ThreadPoolExecutor(workers) as pool:
        grpc_texts = [pool.submit(ask.grpc, client) for ask in asks]
        http_texts = [pool.submit(ask.http, openai) for ask in asks]
        return [f.result() for f in grpc_texts], [f.result() for f in http_texts]


def replica_stats(engine: Any, replicas: int, timeout: float = 60) -> dict[str, dict[str, Any]]:
    """Each running replica's stats (by replica id), asked until `replicas` distinct ones answered."""
    seen: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < replicas:
        if time.monotonic() > deadline:
            raise AssertionError(f"only {len(seen)} of {replicas} replicas answered: {list(seen)}")
        stats = engine.stats.remote().result(timeout_s=30)
        seen[stats["replica"]] = stats
    for _ in range(4 * replicas):   # fresh figures from each
        stats = engine.stats.remote().result(timeout_s=30)
        seen[stats["replica"]] = stats
    return seen


def requests_by_replica(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]],
                        adapter: str) -> dict[str, int]:
    """How many requests for `adapter` each replica served between two snapshots."""
    return {replica: stats["requests"].get(adapter, 0) - before.get(replica, {}).get("requests", {}).get(adapter, 0)
            for replica, stats in after.items()}


def total_loads(snapshot: dict[str, dict[str, Any]]) -> int:
    return sum(stats["loads"] for stats in snapshot.values())
