"""Chunked prefill, measured on the default model (issue 11, part B).

In one run and one process, twice: 8 gRPC streams decode; once each has a few tokens, a ~2,900-token prompt
arrives. Reported per mode: the running streams' longest inter-token gap over their median gap (from their 5th
token until the long prompt's first token plus a second), and the long prompt's time to first token.
Modes: chunked (--max-prefill-chunk auto for the device) and whole-prompt prefill (chunk = --max-batched-tokens).
Target: longest / median <= 3x with the default.

    .venv/bin/python benchmarks/chunked_prefill.py [--json] [--out FILE] [--chunk N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import PROMPTS, emit  # noqa: E402
from benchmarks.hotload import StreamClock  # noqa: E402
from deltaserve.v1 import generation_pb2 as pb  # noqa: E402
from tests.helpers import ServerThread  # noqa: E402

STREAMS = 8
WARM_TOKENS = 5       # a stream's gaps count from its 5th token (its own prefill and first steps excluded)
TAIL_SECONDS = 1.0    # the streams keep decoding this long after the long prompt's first token
LONG_TOKENS = 2900
PARAGRAPH = ("The history of the river valley is a long one. Farmers settled along its banks, built terraces "
             "and canals, and traded grain with the towns downstream. Each spring the floods renewed the soil; "
             "each autumn the harvest was carried to market on flat boats. ")


class Stream(StreamClock):
    """One decoding gRPC stream; records when each token arrived."""

    def __init__(self, server: ServerThread, prompt: str) -> None:
        super().__init__(server, 3000, prompt)

    def gaps(self, end: float) -> list[float]:
        times = [t for t in self.times[WARM_TOKENS - 1:] if t <= end]
        return [b - a for a, b in zip(times, times[1:], strict=False)]


def long_prompt(tokenizer: object) -> tuple[str, int]:
    text = ""
    while len(tokenizer(text)["input_ids"]) < LONG_TOKENS:   # type: ignore[operator]
        text += PARAGRAPH
    return text, len(tokenizer(text)["input_ids"])           # type: ignore[operator]


def measure(server: ServerThread, chunk: int, prompt: str) -> dict[str, float]:
    engine = server.engine
    engine.call(lambda: setattr(engine.scheduler, "max_prefill_chunk", chunk))
    streams = [Stream(server, p) for p in PROMPTS[:STREAMS]]
    while any(len(s.times) < WARM_TOKENS + 5 for s in streams):
        time.sleep(0.01)
    sent = time.perf_counter()
    call = server.stub.GenerateStream(pb.GenerateRequest(text=prompt, stopping=pb.StoppingCriteria(
        max_new_tokens=4, ignore_eos=True)))
    first = None
    for event in call:
        if first is None and event.HasField("token"):
            first = time.perf_counter()
    assert first is not None
    time.sleep(TAIL_SECONDS)
    end = first + TAIL_SECONDS
    for s in streams:
        s.call.cancel()
        s.thread.join()
    gaps = [g for s in streams for g in s.gaps(end)]
    during = [b - a for s in streams for a, b in zip(s.times, s.times[1:], strict=False) if sent <= b <= first]
    median = statistics.median(gaps)
    return {"chunk": chunk, "long_ttft_s": first - sent, "median_gap_ms": median * 1000,
            "max_gap_ms": max(gaps) * 1000, "max_over_median": max(gaps) / median,
            "stream_tokens_while_reading": len(during)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out")
    parser.add_argument("--chunk", type=int, default=0, help="the chunked mode's chunk (0 = auto)")
    args = parser.parse_args()
    # Prefix caching off: the same long prompt is sent three times, and each must be read whole.
    with ServerThread(model="default", kv_cache_tokens=32768, max_prefill_chunk=args.chunk, prefix_caching=False,
                      metrics_port=-1, http_port=-1) as server:
        auto = server.engine.scheduler.max_prefill_chunk
        whole = server.engine.scheduler.max_batched_tokens
        prompt, tokens = long_prompt(server.running.stack.loaded.tokenizer)
        measure(server, auto, prompt)   # warm-up: the first long prefill pays one-time allocations
        results = {"long_prompt_tokens": tokens, "streams": STREAMS,
                   "chunked": measure(server, auto, prompt), "whole": measure(server, whole, prompt)}
    for mode in ("chunked", "whole"):
        r = results[mode]
        print(f"{mode:8s} chunk {r['chunk']:5d}: longest gap {r['max_gap_ms']:7.1f} ms / median "
              f"{r['median_gap_ms']:5.1f} ms = {r['max_over_median']:5.2f}x; long prompt TTFT {r['long_ttft_s']:.2f} s")
    emit(results, args.json, args.out)


if __name__ == "__main__":
    main()
