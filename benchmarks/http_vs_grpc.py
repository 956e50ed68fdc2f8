"""HTTP (OpenAI-compatible, SSE) vs gRPC streaming on the default model (issue 12, acceptance 4).

One server in this process, both APIs over real loopback sockets; N concurrent streaming clients, each asking for
the same prompts and token counts (ignore_eos, greedy), over gRPC (grpc.aio) and over HTTP (httpx, SSE) in
alternating rounds; tokens/s = tokens received / wall time of the round (prefill included). Target: HTTP >= 0.9x.

    .venv/bin/python benchmarks/http_vs_grpc.py [--clients 32] [--tokens 32] [--rounds 2] [--json] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402
import httpx  # noqa: E402

from benchmarks.common import PROMPTS, emit  # noqa: E402
from deltaserve.v1 import generation_pb2 as pb  # noqa: E402
from deltaserve.v1 import generation_pb2_grpc as pb_grpc  # noqa: E402
from tests.helpers import ServerThread  # noqa: E402


async def grpc_round(target: str, prompts: list[str], tokens: int) -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationStub(channel)

        async def one(prompt: str) -> int:
            request = pb.GenerateRequest(text=prompt, stopping=pb.StoppingCriteria(max_new_tokens=tokens,
                                                                                   ignore_eos=True))
            received = 0
            async for event in stub.GenerateStream(request):
                if event.HasField("token"):
                    received += len(event.token.token_ids)
            return received

        return sum(await asyncio.gather(*(one(p) for p in prompts)))


async def http_round(url: str, model: str, prompts: list[str], tokens: int) -> int:
    limits = httpx.Limits(max_connections=len(prompts))
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def one(prompt: str) -> int:
            body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}
            used = 0
            async with client.stream("POST", "/v1/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        usage = json.loads(line[6:]).get("usage")
                        used = usage["completion_tokens"] if usage else used
            return used

        return sum(await asyncio.gather(*(one(p) for p in prompts)))


async def measure(server: ServerThread, clients: int, tokens: int, rounds: int) -> dict[str, object]:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(clients)]
    model = server.running.stack.loaded.model_id
    runs: dict[str, list[float]] = {"grpc": [], "http": []}
    await http_round(server.http_url, model, prompts[:4], 4)      # warm both paths once
    await grpc_round(server.target, prompts[:4], 4)
    for _ in range(rounds):
        for name in ("grpc", "http"):
            start = time.perf_counter()
            if name == "grpc":
                received = await grpc_round(server.target, prompts, tokens)
            else:
                received = await http_round(server.http_url, model, prompts, tokens)
            elapsed = time.perf_counter() - start
            assert received == clients * tokens, (name, received)
            runs[name].append(received / elapsed)
    best = {name: max(values) for name, values in runs.items()}
    return {"clients": clients, "tokens_per_stream": tokens, "rounds": rounds,
            "grpc_tok_s": best["grpc"], "http_tok_s": best["http"], "http_over_grpc": best["http"] / best["grpc"],
            "grpc_runs": runs["grpc"], "http_runs": runs["http"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    with ServerThread(model="default", metrics_port=-1) as server:
        results = asyncio.run(measure(server, args.clients, args.tokens, args.rounds))
    emit(results, args.json, args.out)


if __name__ == "__main__":
    main()
