"""Decode throughput of every adapter method in mixed batches on the default model (issue 4, acceptance 4).

In one process and one run, interleaved: the base model alone; 32 requests spread over 8 adapters of
one kind, for each kind (LoRA r=8 q/v, PEFT prefix, AdapterHub-style prefix, parallel at FFN and at
attention, sequential, MAM); and 32 requests spread over 8 adapters of every kind at once. Prints
ratios to the base model and the memory each adapter takes, per method.

    .venv/bin/python benchmarks/methods_throughput.py [--json] [--out FILE] [--repeats N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import PROMPTS, decode_throughput, emit, requests_for  # noqa: E402
from benchmarks.lora_fixtures import QV, write_peft_lora  # noqa: E402
from benchmarks.method_fixtures import KINDS, write_method_adapter  # noqa: E402
from server.app import build_stack, load  # noqa: E402
from server.config import ServerConfig  # noqa: E402

PER_KIND = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=48)
    args = parser.parse_args()
    loaded = load(ServerConfig())
    root = Path(tempfile.mkdtemp(prefix="methods-"))
    kinds: dict[str, list[str]] = {"lora-r8-qv": []}
    for i in range(PER_KIND):
        name = f"lora-r8-qv-{i}"
        write_peft_lora(root / name, loaded.shape, 8, QV, seed=i)
        kinds["lora-r8-qv"].append(name)
    for kind in KINDS:
        kinds[kind] = []
        for i in range(PER_KIND):
            write_method_adapter(root / f"{kind}-{i}", loaded.shape, kind, seed=i)
            kinds[kind].append(f"{kind}-{i}")
    stack = build_stack(loaded, ServerConfig(adapters_dir=str(root), kv_cache_tokens=16384, max_device_adapters=64))
    engine = stack.engine
    engine.start()
    prompts = PROMPTS[:args.batch]
    everything = [name for names in kinds.values() for name in names[:max(1, args.batch // len(kinds))]]
    runs: dict[str, list[float]] = {}
    try:
        for _ in range(args.repeats):
            runs.setdefault("base", []).append(decode_throughput(engine, requests_for(prompts, args.new_tokens, "b")))
            for kind, names in kinds.items():
                runs.setdefault(kind, []).append(
                    decode_throughput(engine, requests_for(prompts, args.new_tokens, kind, names)))
            runs.setdefault("all-kinds", []).append(
                decode_throughput(engine, requests_for(prompts, args.new_tokens, "all", everything)))
    finally:
        engine.shutdown(0)
    best = {key: max(values) for key, values in runs.items()}
    memory = {kind: stack.store.get(names[0]).nbytes for kind, names in kinds.items()}
    results = {"tok_s": best, "runs": runs, "over_base": {k: v / best["base"] for k, v in best.items()},
               "adapter_bytes": memory, "batch": args.batch, "adapters_per_kind": PER_KIND}
    emit(results, args.json, args.out)
    if not args.json:
        for kind, ratio in results["over_base"].items():
            size = f", {memory[kind] / 2**20:.2f} MiB per adapter" if kind in memory else ""
            print(f"{kind:>20}: {best[kind]:6.0f} tok/s  {ratio:.3f}x base{size}")


if __name__ == "__main__":
    main()
