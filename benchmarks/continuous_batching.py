"""Continuous batching, measured on the default model (issue 2, acceptance 3).

In one run and one process:
1. 16 streams of 64 tokens over real gRPC, concurrently vs one after another (target: < 1/3 the time);
2. a request arriving while 8 others decode starts streaming before they finish;
3. the engine's decode throughput for a batch of 32 vs Hugging Face `generate` on the same 32 prompts
   (target: >= 1.0x).

    .venv/bin/python benchmarks/continuous_batching.py [--json] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import PROMPTS, decode_throughput, emit, generate_decode_throughput, requests_for  # noqa: E402
from deltaserve.v1 import generation_pb2 as pb  # noqa: E402
from tests.helpers import ServerThread  # noqa: E402


def stream_timing(server: ServerThread, prompt: str, new_tokens: int, start: float) -> tuple[float, float]:
    """Returns (first token time, finish time), relative to `start`."""
    request = pb.GenerateRequest(text=prompt, stopping=pb.StoppingCriteria(max_new_tokens=new_tokens,
                                                                           ignore_eos=True))
    first = None
    for event in server.stub.GenerateStream(request):
        if first is None and event.HasField("token"):
            first = time.perf_counter() - start
    assert first is not None
    return first, time.perf_counter() - start


def concurrency(server: ServerThread, n: int = 16, new_tokens: int = 64) -> dict[str, float]:
    prompts = PROMPTS[:n]
    start = time.perf_counter()
    for p in prompts:
        stream_timing(server, p, new_tokens, start)
    sequential = time.perf_counter() - start
    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(lambda p: stream_timing(server, p, new_tokens, start), prompts))
    concurrent = time.perf_counter() - start
    return {"sequential_s": sequential, "concurrent_s": concurrent,
            "concurrent_over_sequential": concurrent / sequential}


def late_arrival(server: ServerThread, running: int = 8, new_tokens: int = 128) -> dict[str, float]:
    start = time.perf_counter()
    results: list[tuple[float, float]] = []
    threads = [threading.Thread(target=lambda p=p: results.append(stream_timing(server, p, new_tokens, start)))
               for p in PROMPTS[:running]]
    for t in threads:
        t.start()
    time.sleep(1.0)
    late_first, late_done = stream_timing(server, "A late question: what is 2 + 2?", 16, start)
    for t in threads:
        t.join()
    return {"late_arrival_s": 1.0, "late_first_token_s": late_first,
            "others_first_finish_s": min(done for _, done in results),
            "late_started_before_others_finished": late_first < min(done for _, done in results)}


def hf_decode_throughput(hf, tokenizer, prompts: list[str], new_tokens: int) -> float:
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    return generate_decode_throughput(hf, enc, new_tokens, pad_token_id=tokenizer.pad_token_id or 0)


def batch_throughput(server: ServerThread, repeats: int, batch: int = 32, new_tokens: int = 64) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from server.model.default_model import default_model_dir

    path = default_model_dir(server.config.cache_dir)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = PROMPTS[:batch]
    engine_runs, hf_runs = [], []
    for _ in range(repeats):  # interleaved, so both see the same machine state
        engine_runs.append(decode_throughput(server.engine, requests_for(prompts, new_tokens, "tput")))
        # on the engine thread, the one thread of the process with torch's compute threads
        hf_runs.append(server.engine.call(lambda: hf_decode_throughput(hf, tokenizer, prompts, new_tokens)))
    best_engine, best_hf = max(engine_runs), max(hf_runs)
    return {"batch": batch, "engine_decode_tok_s": best_engine, "hf_generate_decode_tok_s": best_hf,
            "engine_over_hf": best_engine / best_hf, "engine_runs": engine_runs, "hf_runs": hf_runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with ServerThread(model="default", kv_cache_tokens=32768) as server:
        results = {"concurrency": concurrency(server), "late_arrival": late_arrival(server),
                   "batch_throughput": batch_throughput(server, args.repeats)}
    emit(results, args.json, args.out)
    if not args.json:
        c, la, bt = results["concurrency"], results["late_arrival"], results["batch_throughput"]
        print(f"16 x 64 tokens: sequential {c['sequential_s']:.2f}s, concurrent {c['concurrent_s']:.2f}s "
              f"-> {c['concurrent_over_sequential']:.3f}x (target < 0.333)")
        print(f"late request: first token at {la['late_first_token_s']:.2f}s, first of the others finished at "
              f"{la['others_first_finish_s']:.2f}s")
        print(f"batch 32 decode: engine {bt['engine_decode_tok_s']:.0f} tok/s, HF generate "
              f"{bt['hf_generate_decode_tok_s']:.0f} tok/s -> {bt['engine_over_hf']:.2f}x (target >= 1.0)")


if __name__ == "__main__":
    main()
