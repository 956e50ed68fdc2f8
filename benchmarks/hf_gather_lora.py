"""The issue-3 reference point: Hugging Face's own decode step plus a plain gather-and-bmm LoRA delta.

Batch of 32, every row its own adapter, LoRA on all seven linears (or q/v): the per-row weights are gathered
once (the best case for this approach) and every targeted linear adds bmm(bmm(x, A_rows^T), B_rows^T) through a
forward hook. Reports HF `generate` decode throughput with and without the hooks, interleaved, best of N.
This process runs torch on its main thread only (one OpenMP team), as the engine's benchmarks do on theirs.

    .venv/bin/python benchmarks/hf_gather_lora.py [--rank 16] [--targets all|qv] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import PROMPTS, emit, generate_decode_throughput  # noqa: E402
from benchmarks.lora_fixtures import ALL_LINEARS, QV  # noqa: E402


def gathered_weights(model: torch.nn.Module, rank: int, rows: int, targets: tuple[str, ...]) -> dict[str, tuple]:
    """Linear name -> (A_rows^T [rows, in, r], B_rows^T [rows, r, out]): one random adapter per row."""
    gen = torch.Generator().manual_seed(0)
    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            a = torch.randn(rows, rank, module.in_features, generator=gen) / module.in_features ** 0.5
            bt = torch.randn(rows, rank, module.out_features, generator=gen) * 0.02
            weights[name] = (a.transpose(1, 2), bt)
    return weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", choices=("all", "qv"), default="all")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from server.model.default_model import default_model_dir

    path = default_model_dir(str(Path.home() / ".cache" / "deltaserve"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    enc = tokenizer(PROMPTS[:args.batch], return_tensors="pt", padding=True)
    weights = gathered_weights(model, args.rank, args.batch, ALL_LINEARS if args.targets == "all" else QV)

    def hook(a_t: torch.Tensor, bt: torch.Tensor):  # noqa: ANN202
        return lambda module, inputs, out: out.add_(torch.bmm(torch.bmm(inputs[0], a_t), bt))

    pad = tokenizer.pad_token_id or 0
    runs: dict[str, list[float]] = {"hf_base": [], "hf_gather_bmm": []}
    for _ in range(args.repeats):
        runs["hf_base"].append(generate_decode_throughput(model, enc, args.new_tokens, pad_token_id=pad))
        handles = [module.register_forward_hook(hook(*weights[name]))
                   for name, module in model.named_modules() if name in weights]
        runs["hf_gather_bmm"].append(generate_decode_throughput(model, enc, args.new_tokens, pad_token_id=pad))
        for handle in handles:
            handle.remove()
    best = {key: max(values) for key, values in runs.items()}
    results = {"rank": args.rank, "targets": args.targets, "batch": args.batch, "tok_s": best, "runs": runs,
               "gather_bmm_over_base": best["hf_gather_bmm"] / best["hf_base"]}
    emit(results, args.json, args.out)
    if not args.json:
        print(f"HF decode {best['hf_base']:.0f} tok/s; with per-row gather-and-bmm LoRA (r={args.rank}, "
              f"{args.targets}) {best['hf_gather_bmm']:.0f} tok/s -> {results['gather_bmm_over_base']:.3f}x")


if __name__ == "__main__":
    main()
