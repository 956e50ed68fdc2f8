"""Shared pieces of the benchmarks: an in-process server, engine drivers, timing, output."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.engine.engine import Engine  # noqa: E402
from server.engine.request import GenerationRequest  # noqa: E402

PROMPTS = [f"Write a short story about a {thing} who {deed}." for thing in
           ("cat", "dog", "robot", "king", "fish", "bird", "tree", "ship")
           for deed in ("learns to sing", "gets lost", "finds a key", "builds a house")]


def submit_all(engine: Engine, requests: list[GenerationRequest],
               results: dict[int, Any] | None = None) -> list[threading.Event]:
    """Submits every request; each event is set when its request finishes, and `results` (when given) gets each
    request's GenerationResult (None if it failed) under its index."""
    events = []
    for index, request in enumerate(requests):
        done = threading.Event()

        def sink(out: Any, index: int = index, done: threading.Event = done) -> None:
            if out.finished:
                if results is not None:
                    results[index] = out.result
                done.set()

        engine.submit(request, sink)
        events.append(done)
    return events


def decode_throughput(engine: Engine, requests: list[GenerationRequest]) -> float:
    """Tokens/s over the steps in which every request decodes (prefill excluded)."""
    steps: list[tuple[float, int, bool]] = []
    full = len(requests)

    def on_step(seqs: list[Any]) -> None:
        steps.append((time.perf_counter(), len(seqs), all(s.num_cached > len(s.prompt_ids) for s in seqs)))

    engine.on_step = on_step
    try:
        for done in submit_all(engine, requests):
            done.wait()
    finally:
        engine.on_step = None
    decode = [(t, n) for t, n, is_decode in steps if is_decode and n == full]
    if len(decode) < 2:
        raise RuntimeError("too few full decode steps to measure")
    return sum(n for _, n in decode[1:]) / (decode[-1][0] - decode[0][0])


def generate_decode_throughput(model: Any, enc: dict, new_tokens: int, **kwargs: Any) -> float:
    """Tokens/s of Hugging Face `generate` (greedy) over the steps after the first: a 1-token run's time (the
    prefill) is subtracted from a `new_tokens` run's. `kwargs` go to both (pad_token_id, adapter_names...)."""
    import torch

    kwargs = dict(do_sample=False, **kwargs)
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(**enc, max_new_tokens=1, min_new_tokens=1, **kwargs)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        total = time.perf_counter() - start
    return enc["input_ids"].shape[0] * (new_tokens - 1) / (total - prefill)


def emit(results: dict[str, Any], as_json: bool, out_path: str | None = None) -> None:
    text = json.dumps(results, indent=2)
    if out_path:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_text(text + "\n")
    if as_json:
        print(text)


def requests_for(prompts: list[str], new_tokens: int, tag: str, adapters: list[str] | None = None) -> list[
        GenerationRequest]:
    return [GenerationRequest(f"{tag}-{i}-{time.monotonic_ns()}", prompt=p, max_new_tokens=new_tokens,
                              ignore_eos=True, adapter_id=(adapters[i % len(adapters)] if adapters else ""))
            for i, p in enumerate(prompts)]

