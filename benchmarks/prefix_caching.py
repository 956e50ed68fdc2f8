"""Prefix caching, measured on the default model over gRPC (issue 11, acceptance 3).

One server, one process: 12 chat requests, one after another, share a ~1,500-token system prompt and differ in
their user message. First with prefix caching off, then on (the off pass registers nothing, so the on pass starts
cold). Reported per mode: each request's time to first token, the median of the later 11, and their ratio; and
whether every request's tokens are the same in both modes.

    .venv/bin/python benchmarks/prefix_caching.py [--json] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import emit  # noqa: E402
from deltaserve.v1 import generation_pb2 as pb  # noqa: E402
from tests.helpers import ServerThread  # noqa: E402

REQUESTS = 12
SYSTEM_TOKENS = 1500
NEW_TOKENS = 8
RULES = ("You are the support assistant of a river-boat company. Rule {n}: answer politely, cite the timetable "
         "when asked about departures, never promise refunds without a ticket number, and keep answers short. ")
QUESTIONS = ["When does the first boat leave?", "Can I bring a bicycle?", "Is there a cafe on board?",
             "How long is the trip to the delta?", "Do children travel free?", "Where do I buy tickets?",
             "Is the boat wheelchair accessible?", "What happens when it rains?", "Can I book a cabin?",
             "Are dogs allowed?", "Is there parking at the pier?", "How do I get a refund?"]


def system_prompt(tokenizer: object) -> tuple[str, int]:
    text, n = "", 0
    while len(tokenizer(text)["input_ids"]) < SYSTEM_TOKENS:   # type: ignore[operator]
        n += 1
        text += RULES.format(n=n)
    return text, len(tokenizer(text)["input_ids"])             # type: ignore[operator]


def ask(server: ServerThread, system: str, question: str) -> tuple[float, list[int]]:
    """Time to first token of one streamed chat request, and its tokens."""
    chat = pb.ChatPrompt(messages=[pb.ChatMessage(role="system", content=system),
                                   pb.ChatMessage(role="user", content=question)])
    request = pb.GenerateRequest(chat=chat, stopping=pb.StoppingCriteria(max_new_tokens=NEW_TOKENS,
                                                                         ignore_eos=True))
    start, first, tokens = time.perf_counter(), None, []
    for event in server.stub.GenerateStream(request):
        if event.HasField("token"):
            first = first or time.perf_counter()
            tokens.extend(event.token.token_ids)
    assert first is not None
    return first - start, tokens


def measure(server: ServerThread, system: str, caching: bool) -> dict[str, object]:
    engine = server.engine
    engine.call(lambda: setattr(engine.blocks, "caching", caching))
    hits = engine.call(lambda: engine.blocks.hit_tokens)
    ttfts, outputs = [], []
    for question in QUESTIONS[:REQUESTS]:
        ttft, tokens = ask(server, system, question)
        ttfts.append(ttft)
        outputs.append(tokens)
    return {"ttft_s": ttfts, "first_ttft_s": ttfts[0], "later_median_ttft_s": statistics.median(ttfts[1:]),
            "hit_tokens": engine.call(lambda: engine.blocks.hit_tokens) - hits, "outputs": outputs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    with ServerThread(model="default", kv_cache_tokens=32768, metrics_port=-1, http_port=-1) as server:
        system, tokens = system_prompt(server.running.stack.loaded.tokenizer)
        ask(server, "A different system prompt, for warm-up.", QUESTIONS[0])
        off = measure(server, system, caching=False)
        on = measure(server, system, caching=True)
    same = off.pop("outputs") == on.pop("outputs")
    results = {"system_prompt_tokens": tokens, "requests": REQUESTS, "off": off, "on": on,
               "later_median_speedup": off["later_median_ttft_s"] / on["later_median_ttft_s"],
               "outputs_identical": same}
    for mode, r in (("off", off), ("on", on)):
        print(f"caching {mode:3s}: first TTFT {r['first_ttft_s']:.3f} s, median of the later {REQUESTS - 1} "
              f"{r['later_median_ttft_s']:.3f} s, {r['hit_tokens']} prompt tokens reused")
    print(f"later requests' median TTFT, off / on: {results['later_median_speedup']:.1f}x; "
          f"outputs identical: {same}")
    emit(results, args.json, args.out)


if __name__ == "__main__":
    main()
