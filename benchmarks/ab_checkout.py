"""Decode tokens/s of one checkout's engine on the default model, for A/B comparisons of two commits run in
alternation (one process per run, so each side imports its own code).

Variants at batch 32: base, 32 distinct LoRA r=16 on all linears, 32 distinct r=8 on q/v, every kind mixed (4 of
each of the six other kinds and 8 LoRA r=8). Prints one JSON line: variant -> the tok/s of each repeat.

    git worktree add /tmp/ab_old <commit>; git worktree add /tmp/ab_new <commit>
    for round in 1 2 3; do for side in old new; do
        .venv/bin/python benchmarks/ab_checkout.py /tmp/ab_$side --repeats 2; done; done
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkout", help="the repository checkout whose engine is measured")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=48)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(args.checkout).resolve()))
    from benchmarks.common import PROMPTS, decode_throughput, requests_for
    from benchmarks.lora_fixtures import ALL_LINEARS, QV, write_peft_lora
    from benchmarks.method_fixtures import KINDS, write_method_adapter
    from server.app import build_stack, load
    from server.config import ServerConfig

    loaded = load(ServerConfig())
    root = Path(tempfile.mkdtemp(prefix="ab-"))
    families = {"r16-all-32": [f"r16-{i}" for i in range(32)], "r8-qv-32": [f"r8-{i}" for i in range(32)]}
    for i in range(32):
        write_peft_lora(root / f"r16-{i}", loaded.shape, 16, ALL_LINEARS, seed=i)
        write_peft_lora(root / f"r8-{i}", loaded.shape, 8, QV, seed=i)
    mixed = []
    for kind in KINDS:
        for i in range(4):
            write_method_adapter(root / f"{kind}-{i}", loaded.shape, kind, seed=i)
            mixed.append(f"{kind}-{i}")
    variants = {"base": None, **families, "all-kinds": (mixed + families["r8-qv-32"][:8])[:32]}
    stack = build_stack(loaded, ServerConfig(adapters_dir=str(root), kv_cache_tokens=16384, max_device_adapters=96,
                                             max_lora_rank=16))
    engine, prompts = stack.engine, (PROMPTS * 2)[:32]
    engine.start()
    out: dict[str, list[float]] = {}
    try:
        for key, names in variants.items():   # warm-up: every adapter read and placed before anything is measured
            try:
                decode_throughput(engine, requests_for(prompts, 16, key, names))
            except RuntimeError:   # too short to measure: only the warming matters here
                pass
        for _ in range(args.repeats):
            for key, names in variants.items():
                tok_s = decode_throughput(engine, requests_for(prompts, args.tokens, key, names))
                out.setdefault(key, []).append(tok_s)
    finally:
        engine.shutdown(0)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
