"""Soak run: N minutes (default 10) of mixed concurrent traffic against a real `deltaserve serve` process.

Adapters of every method (PEFT LoRA, PEFT-style and AdapterHub-style prefix, parallel at FFN and at attention,
sequential, MAM), two variants each, are loaded, reloaded and unloaded through the admin API all along, while
client threads send streams and unary calls for them and for the base model, cancel streams, set deadlines that
expire, and send bad requests (bad sampling, unknown adapters, a 64 KB adapter id, garbage bytes). Every
answer is checked token for token against the offline answer of the adapter version that served it. Reports
requests by outcome, failures by cause, wrong answers, and the server's resident memory over time.

    .venv/bin/python benchmarks/soak.py [--minutes 10] [--clients 16] [--json] [--out FILE] [--markdown FILE]

The model is a randomly initialised 2-layer Llama with the default model's tokenizer (many requests a second
on a CPU, so the churn is heavy); `--model DIR` serves another one.
"""

from __future__ import annotations

import argparse
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import emit  # noqa: E402
from benchmarks.lora_fixtures import ALL_LINEARS, write_peft_lora  # noqa: E402
from benchmarks.method_fixtures import KINDS, write_method_adapter  # noqa: E402
from benchmarks.soak_traffic import NEW_TOKENS, Client, Tally, Timeline, operator  # noqa: E402
from deltaserve.v1 import adapters_pb2_grpc as apb_grpc  # noqa: E402
from server.model.loader import load_model  # noqa: E402
from tests.hotload_helpers import offline_tokens  # noqa: E402

PROMPTS = ["Hello there", "The quick brown fox", "1 2 3 4", "Why is the sky blue?"]
TOKEN = "soak-admin-token"


def tiny_model(directory: Path, cache_dir: str) -> Path:
    """A random 2-layer Llama with the default model's tokenizer (as the tests' tiny model)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from server.model.default_model import default_model_dir

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir(cache_dir))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def library(root: Path, shape: Any, per_kind: int, variants: int) -> dict[str, list[str]]:
    """Adapter directories: `per_kind` names for every method, `variants` weight sets each."""
    names: dict[str, list[str]] = {}
    kinds = ["lora", *KINDS]
    for k, kind in enumerate(kinds):
        for n in range(per_kind):
            name = f"{kind}-{n}"
            for v in range(variants):
                path, seed = root / f"{name}.v{v}", 1000 * k + 10 * n + v
                if kind == "lora":
                    write_peft_lora(path, shape, 4, ALL_LINEARS, seed=seed, alpha=64.0 * 4)
                else:
                    write_method_adapter(path, shape, kind, seed=seed)
                names.setdefault(name, []).append(path.name)
    return names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, root: Path, cache_dir: str, log: Path) -> tuple[subprocess.Popen, int]:
    port, metrics = free_port(), free_port()
    # `python -m server.cli` from this checkout: the server runs the code next to this script.
    command = [sys.executable, "-m", "server.cli", "serve", "--model", str(model), "--device", "cpu",
               "--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics), "--http-port", "-1",
               "--adapters-load-root", str(root), "--max-device-adapters", "8", "--max-host-adapters", "12",
               "--kv-cache-tokens", "8192", "--cache-dir", cache_dir, "--log-level", "WARNING"]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO,
                               env={**_environ(), "DELTASERVE_ADMIN_TOKEN": TOKEN})
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(600):
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return process, port
            except grpc.RpcError:
                pass
            if process.poll() is not None:
                raise RuntimeError(f"the server exited early; see {log}")
            time.sleep(0.5)
    raise RuntimeError("the server did not report SERVING")


def _environ() -> dict[str, str]:
    import os

    return dict(os.environ)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def sample_memory(pid: int, stop: threading.Event, samples: list[tuple[float, float]], start: float) -> None:
    while not stop.wait(5.0):
        samples.append((time.monotonic() - start, rss_mib(pid)))


def memory_summary(samples: list[tuple[float, float]], warmup: float) -> dict[str, Any]:
    """RSS per minute (max), and growth from the end of warm-up to the last minute's mean."""
    per_minute: dict[int, float] = {}
    for t, mib in samples:
        per_minute[int(t // 60)] = max(per_minute.get(int(t // 60), 0.0), mib)
    after = [mib for t, mib in samples if t >= warmup]
    end = samples[-1][0] if samples else 0.0
    last = [mib for t, mib in samples if t >= end - 60] or after
    base = after[0] if after else 0.0
    growth = (statistics.mean(last) - base) / base if base else 0.0
    return {"per_minute_max_mib": {str(k): round(v, 1) for k, v in sorted(per_minute.items())},
            "after_warmup_mib": round(base, 1), "last_minute_mean_mib": round(statistics.mean(last), 1)
            if last else 0.0, "growth_after_warmup": round(growth, 4)}


def expected_answers(model_dir: Path, root: Path, cache_dir: str,
                     names: dict[str, list[str]]) -> dict[str, list[list[int]]]:
    """Offline greedy tokens of every variant (and of the base model, key ""), one prompt at a time."""
    offline = load_model(str(model_dir), cache_dir, "cpu", "float32")
    answers = {"": offline_tokens(offline, None, PROMPTS, NEW_TOKENS)}
    for variants in names.values():
        for variant in variants:
            answers[variant] = offline_tokens(offline, root / variant, PROMPTS, NEW_TOKENS)
    return answers


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    model = Path(args.model) if args.model else tiny_model(work / "model", args.cache_dir)
    root = work / "adapters"
    shape = load_model(str(model), args.cache_dir, "cpu", "float32").shape
    names = library(root, shape, args.per_kind, args.variants)
    expected = expected_answers(model, root, args.cache_dir, names)
    distinct = sum(len({tuple(expected[v][p]) for v in vs}) > 1 for vs in names.values() for p in range(len(PROMPTS)))
    process, port = start_server(model, root, args.cache_dir, work / "server.log")
    timeline, tally, stop, samples = Timeline(), Tally(), threading.Event(), []
    start = time.monotonic()
    deadline = start + 60 * args.minutes
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        admin = threading.Thread(target=operator, args=(apb_grpc.AdaptersStub(channel), TOKEN, sorted(names), names,
                                                        timeline, stop, random.Random(7), args.churn_period))
        admin.start()
        while len(timeline.variant_of) < len(names):
            time.sleep(0.05)
        memory = threading.Thread(target=sample_memory, args=(process.pid, stop, samples, start))
        memory.start()
        clients = [threading.Thread(target=Client(channel, sorted(names), PROMPTS, expected, timeline, tally,
                                                  random.Random(i)).run, args=(deadline,))
                   for i in range(args.clients)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()
        stop.set()
        admin.join()
        memory.join()
        alive = process.poll() is None
    finally:
        stop.set()
        channel.close()
        process.terminate()
        process.wait(timeout=60)
    return report(args, time.monotonic() - start, tally, timeline, samples, alive, len(names), distinct)


def report(args: argparse.Namespace, seconds: float, tally: Tally, timeline: Timeline,
           samples: list[tuple[float, float]], alive: bool, adapters: int, distinct: int) -> dict[str, Any]:
    unexpected = sum(n for outcome, n in tally.outcomes.items() if outcome.startswith("unexpected"))
    return {
        "minutes": round(seconds / 60, 2), "clients": args.clients, "adapters": adapters,
        "variants_per_adapter": args.variants, "variant_pairs_with_different_answers": distinct,
        "requests": sum(tally.outcomes.values()), "answers_checked": tally.checked, "tokens_checked": tally.tokens,
        "wrong_answers": len(tally.wrong), "unexpected_failures": unexpected,
        "outcomes": dict(sorted(tally.outcomes.items())), "operations": dict(timeline.operations),
        "server_alive_at_end": alive, "memory": memory_summary(samples, args.warmup_seconds),
        "wrong_examples": tally.wrong[:5], "unexpected_examples": tally.unexpected,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [f"- {result['minutes']} minutes, {result['clients']} clients, {result['adapters']} adapters × "
             f"{result['variants_per_adapter']} variants; {result['requests']} requests, "
             f"{result['answers_checked']} answers ({result['tokens_checked']} tokens) checked against offline",
             f"- wrong answers: **{result['wrong_answers']}**; failures not meant to fail: "
             f"**{result['unexpected_failures']}**; server alive at the end: {result['server_alive_at_end']}",
             f"- operator: {result['operations']}", "", "| outcome | requests |", "|---|---|"]
    lines += [f"| {outcome} | {n} |" for outcome, n in result["outcomes"].items()]
    mem = result["memory"]
    lines += ["", "| minute | server RSS, max (MiB) |", "|---|---|"]
    lines += [f"| {minute} | {mib} |" for minute, mib in mem["per_minute_max_mib"].items()]
    lines += ["", f"RSS after warm-up {mem['after_warmup_mib']} MiB, last minute's mean "
              f"{mem['last_minute_mean_mib']} MiB: growth {100 * mem['growth_after_warmup']:.2f}%"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--per-kind", type=int, default=2, help="adapter names per method")
    parser.add_argument("--variants", type=int, default=2, help="weight sets per name (reloads switch them)")
    parser.add_argument("--churn-period", type=float, default=1.0, help="seconds between admin operations")
    parser.add_argument("--warmup-seconds", type=float, default=60.0)
    parser.add_argument("--model", default="", help="a model directory (default: a random 2-layer Llama)")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "deltaserve"))
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--markdown", default=None, help="also write the report as Markdown to this file")
    args = parser.parse_args()
    result = run(args)
    emit(result, args.json, args.out)
    if args.markdown:
        Path(args.markdown).write_text(markdown(result))
    if result["wrong_answers"] or result["unexpected_failures"] or not result["server_alive_at_end"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
