"""Per-request LoRA decode throughput on the default model (issue 3, acceptance 3).

In one process and one run, interleaved so every variant sees the same machine state:
base model alone; the same batch with 1, 4, 16, 32 (and 64) distinct LoRA adapters; and PEFT's
mixed-batch `generate(adapter_names=...)` on the same adapters. Two shapes: r=8 on q/v, r=16 on all
seven linears. Prints ratios; `--json` prints everything machine-readably.

    .venv/bin/python benchmarks/lora_throughput.py [--json] [--out FILE] [--repeats N] [--skip-peft]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from benchmarks.common import PROMPTS, decode_throughput, emit, generate_decode_throughput, requests_for  # noqa: E402
from benchmarks.lora_fixtures import ALL_LINEARS, QV, write_peft_lora  # noqa: E402
from server.app import build_stack, load  # noqa: E402
from server.config import ServerConfig  # noqa: E402
from tests.helpers import load_peft_adapters  # noqa: E402

SHAPES = {"r8-qv": (8, QV), "r16-all": (16, ALL_LINEARS)}
DISTINCT = (1, 4, 16, 32, 64)


def peft_decode_throughput(peft_model, tokenizer, prompts: list[str], names: list[str], new_tokens: int) -> float:
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    return generate_decode_throughput(peft_model, enc, new_tokens, pad_token_id=tokenizer.pad_token_id or 0,
                                      adapter_names=names)


def measure_shape(shape_name: str, batch: int, new_tokens: int, repeats: int, peft: bool) -> dict:
    # A fresh model per shape: a stack's delta hooks stay on the model it was built on.
    loaded = load(ServerConfig())
    rank, targets = SHAPES[shape_name]
    root = Path(tempfile.mkdtemp(prefix=f"lora-{shape_name}-"))
    names = [f"{shape_name}-{i}" for i in range(max(DISTINCT))]
    for i, name in enumerate(names):
        write_peft_lora(root / name, loaded.shape, rank, targets, seed=i)
    stack = build_stack(loaded, ServerConfig(adapters_dir=str(root), kv_cache_tokens=16384,
                                             max_device_adapters=max(DISTINCT), max_lora_rank=rank))
    engine = stack.engine
    engine.start()
    runs: dict[str, list[float]] = {}
    peft_model = load_peft_adapters(loaded.path, root, names[:batch]) if peft else None
    try:
        for _ in range(repeats):
            for n in DISTINCT:
                size = max(batch, n)
                prompts = (PROMPTS * 2)[:size]
                runs.setdefault(f"base@{size}", []).append(
                    decode_throughput(engine, requests_for(prompts, new_tokens, "base")))
                runs.setdefault(f"distinct{n}@{size}", []).append(
                    decode_throughput(engine, requests_for(prompts, new_tokens, "lora", names[:n])))
            if peft_model is not None:
                # on the engine thread, the one thread of the process with torch's compute threads
                runs.setdefault(f"peft_distinct{batch}@{batch}", []).append(engine.call(lambda: peft_decode_throughput(
                    peft_model, loaded.tokenizer, PROMPTS[:batch], names[:batch], new_tokens)))
    finally:
        engine.shutdown(0)
    best = {key: max(values) for key, values in runs.items()}
    adapter = stack.store.get(names[0])
    result = {"rank": rank, "targets": list(targets), "tok_s": best, "runs": runs,
              "adapter_bytes": adapter.nbytes, "adapter_parameters": adapter.num_parameters, "ratios": {}}
    for n in DISTINCT:
        size = max(batch, n)
        result["ratios"][f"distinct{n}_over_base"] = best[f"distinct{n}@{size}"] / best[f"base@{size}"]
    if peft:
        result["ratios"][f"distinct{batch}_over_peft"] = best[f"distinct{batch}@{batch}"] / best[
            f"peft_distinct{batch}@{batch}"]
        result["ratios"]["peft_over_base"] = best[f"peft_distinct{batch}@{batch}"] / best[f"base@{batch}"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--skip-peft", action="store_true")
    args = parser.parse_args()
    results = {name: measure_shape(name, args.batch, args.new_tokens, args.repeats, not args.skip_peft)
               for name in args.shapes.split(",")}
    emit(results, args.json, args.out)
    if not args.json:
        for name, r in results.items():
            ratios = ", ".join(f"{k} {v:.3f}" for k, v in r["ratios"].items())
            print(f"{name}: {ratios}; adapter {r['adapter_bytes'] / 2**20:.2f} MiB "
                  f"({r['adapter_parameters']} parameters)")
            print("   tok/s: " + ", ".join(f"{k} {v:.0f}" for k, v in r["tok_s"].items()))


if __name__ == "__main__":
    main()
