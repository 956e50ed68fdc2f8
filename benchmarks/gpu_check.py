"""The GPU check (issue 16): one script, one JSON, within 8 minutes on one GPU host with no network.

It builds randomly initialised models from configs (the default model's shape, SmolLM2-135M, and a 1B-class Llama
shape; benchmarks/gpu_check_models.py) and measures, on the device:

- kernels: each Triton kernel against the torch reference in fp32 and bf16 (worst error / derived bound, ≤ 1 passes);
- model-level parity in the serving dtype: the engine's logits (prefill, then two decode steps) against PEFT's,
  base and LoRA rows mixed (benchmarks/gpu_check_parity.py states the criterion);
- engine decode tokens/s at batch 32 vs Hugging Face `generate` on the same weights;
- 32 distinct LoRA adapters, r=8 on q/v and r=16 on all seven linears, vs the base model;
- all seven method kinds mixed in one batch vs base; PEFT's mixed batch (`adapter_names`, r=8 q/v) for scale;
- achieved memory bandwidth: the bytes a decode step must read (weights, KV context, the batch's adapters) × steps/s;
- captured decode steps (CUDA graphs) against eager ones: tokens/s, and whether the greedy tokens agree.

Stock environment only: torch, triton, transformers, peft, safetensors, grpcio, protobuf, prometheus-client.

    python benchmarks/gpu_check.py [--out gpu_check.json] [--models smollm2-135m,llama-1b] [--kernels triton]
    python benchmarks/gpu_check.py --dry-run     # the whole flow on CPU, tiny shapes (Triton interpreted)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if "--dry-run" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before any Triton kernel is decorated
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import decode_throughput, emit, generate_decode_throughput, requests_for, submit_all  # noqa: E402
from benchmarks.gpu_check_models import SHAPES, build_model_dir, prompts, weight_bytes  # noqa: E402
from benchmarks.gpu_check_parity import parity  # noqa: E402
from benchmarks.lora_fixtures import ALL_LINEARS, QV, write_peft_lora  # noqa: E402
from benchmarks.method_fixtures import KINDS, write_method_adapter  # noqa: E402

PLANS = {
    "full": dict(models=("smollm2-135m", "llama-1b"), batch=32, distinct=32, per_kind=5, prompt_len=32,
                 new_tokens=64, kv_tokens=32768, rounds=2),
    "dry": dict(models=("tiny",), batch=4, distinct=4, per_kind=1, prompt_len=8, new_tokens=6, kv_tokens=2048,
                rounds=1),
}
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "L40S": 0.864e12, "A10": 0.6e12}


def guarded(fn: Any, *args: Any) -> dict[str, Any]:
    """fn(*args), or {'error': ...} with the traceback's tail: a first GPU run reports every part it can."""
    try:
        return fn(*args)
    except Exception as exc:   # noqa: BLE001  (recorded in the JSON, the run goes on)
        import traceback

        return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}


def kernel_errors(device: str) -> dict[str, Any]:
    """Worst error/bound ratio and largest absolute error of every kernel, fp32 and bf16, on the device."""
    from tests.kernel_cases import attention_case, bottleneck_case, lora_case

    out: dict[str, Any] = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        for case, run in (("lora_decode", lambda d: lora_case(d, device, 1)),
                          ("lora_prefill", lambda d: lora_case(d, device, 24, seed=24)),
                          ("bottleneck", lambda d: bottleneck_case(d, device)),
                          ("decode_attention", lambda d: attention_case(d, device))):
            ratio, err = run(dtype)
            out[f"{case}/{name}"] = {"error_over_bound": ratio, "max_abs_error": err, "pass": ratio <= 1.0}
    out["all_pass"] = all(v["pass"] for v in out.values() if isinstance(v, dict))
    return out


def write_adapters(root: Path, shape: Any, plan: dict) -> dict[str, list[str]]:
    """Adapters on disk by family: 'lora-r8-qv', 'lora-r16-all' (plan['distinct'] each), and plan['per_kind'] of
    every other method kind."""
    families: dict[str, list[str]] = {}
    for family, rank, targets in (("lora-r8-qv", 8, QV), ("lora-r16-all", 16, ALL_LINEARS)):
        families[family] = [f"{family}-{i}" for i in range(plan["distinct"])]
        for i, name in enumerate(families[family]):
            write_peft_lora(root / name, shape, rank, targets, seed=i)
    for kind in KINDS:
        families[kind] = [f"{kind}-{i}" for i in range(plan["per_kind"])]
        for i, name in enumerate(families[kind]):
            write_method_adapter(root / name, shape, kind, seed=i)
    return families


def mixed(families: dict[str, list[str]], batch: int) -> list[str]:
    """One adapter name per request, the seven kinds taking turns (LoRA r=8 q/v and the six others)."""
    kinds = ["lora-r8-qv", *KINDS]
    return [families[kinds[i % len(kinds)]][(i // len(kinds)) % len(families[kinds[i % len(kinds)]])]
            for i in range(batch)]


def engine_runs(stack: Any, texts: list[str], families: dict[str, list[str]], plan: dict) -> dict[str, float]:
    """Decode tokens/s of the engine: base, 32 distinct LoRA of each shape, every kind mixed (best of the plan's
    rounds)."""
    engine, new = stack.engine, plan["new_tokens"]
    variants = {"base": None, "lora-r8-qv": families["lora-r8-qv"], "lora-r16-all": families["lora-r16-all"],
                "all-kinds": mixed(families, plan["batch"])}
    best: dict[str, float] = {}
    for _ in range(plan["rounds"]):
        for key, names in variants.items():
            tok_s = decode_throughput(engine, requests_for(texts, new, key, names))
            best[key] = max(best.get(key, 0.0), tok_s)
    return best


def greedy_tokens(engine: Any, requests: list[Any]) -> list[list[int]]:
    """Every request's generated tokens (all submitted at once; [] for one that failed)."""
    results: dict[int, Any] = {}
    for done in submit_all(engine, requests, results):
        done.wait()
    return [list(results[i].token_ids) if results[i] is not None else [] for i in range(len(requests))]


def graph_runs(stack: Any, texts: list[str], families: dict[str, list[str]], plan: dict,
               captured_tok_s: dict[str, float]) -> dict[str, Any]:
    """Captured decode steps against eager ones: tokens/s of base and every kind mixed (best of the plan's rounds),
    and how many requests of every kind mixed get the same greedy tokens both ways."""
    from server.engine.graphs import DecodeGraphs, EagerCapture

    engine = stack.engine
    runner = engine.runner
    graphs = runner.graphs
    if graphs is None and stack.deltas.methods["lora"].backend.captures:   # the dry run: no CUDA, same flow
        graphs = DecodeGraphs(stack.loaded.model, runner.kv_cache, stack.deltas, plan["batch"], EagerCapture())
        engine.call(lambda: setattr(runner, "graphs", graphs))
    if graphs is None:
        return {"skipped": "decode steps are captured on CUDA with the triton kernels only"}
    names, new = mixed(families, plan["batch"]), plan["new_tokens"]
    captured = greedy_tokens(engine, requests_for(texts, new, "graphs", names))
    engine.call(lambda: setattr(runner, "graphs", None))
    try:
        eager_tokens = greedy_tokens(engine, requests_for(texts, new, "eager", names))
        eager = {key: max(decode_throughput(engine, requests_for(texts, new, key, adapters))
                          for _ in range(plan["rounds"]))
                 for key, adapters in (("base", None), ("all-kinds", names))}
    finally:
        engine.call(lambda: setattr(runner, "graphs", graphs))
    same = sum(a == b for a, b in zip(captured, eager_tokens, strict=True))
    return {"captures": graphs.captures, "replays": graphs.replays, "eager_tok_s": eager,
            "captured_over_eager": {key: captured_tok_s[key] / tok_s for key, tok_s in eager.items()},
            "requests_with_equal_greedy_tokens": f"{same}/{len(names)}"}


def hf_generate(model_dir: Path, texts: list[str], plan: dict, device: str, dtype: torch.dtype) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    enc = tokenizer(texts, return_tensors="pt").to(device)
    tok_s = generate_decode_throughput(model, enc, plan["new_tokens"], pad_token_id=0)
    del model
    return tok_s


def peft_generate(model_dir: Path, adapters: Path, names: list[str], texts: list[str], plan: dict, device: str,
                  dtype: torch.dtype) -> float:
    """PEFT's mixed batch: every request its own adapter through `generate(adapter_names=...)`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    model = PeftModel.from_pretrained(base, adapters / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters / name, adapter_name=name)
    model = model.to(device=device, dtype=dtype).eval()
    enc = tokenizer(texts, return_tensors="pt").to(device)
    per_row = [names[i % len(names)] for i in range(len(texts))]
    tok_s = generate_decode_throughput(model, enc, plan["new_tokens"], pad_token_id=0, adapter_names=per_row)
    del model, base
    return tok_s


def step_bytes(loaded: Any, plan: dict, adapter_bytes: int = 0) -> int:
    """Bytes one decode step of the batch must read: every weight once, each row's KV context (its average over
    the run), and the batch's adapters once."""
    shape = loaded.shape
    context = plan["prompt_len"] + plan["new_tokens"] // 2
    kv = plan["batch"] * context * shape.num_layers * 2 * shape.num_kv_heads * shape.head_dim
    return weight_bytes(loaded.model) + kv * loaded.dtype.itemsize + adapter_bytes


def bandwidth(tok_s: float, nbytes: int, batch: int, device_name: str) -> dict[str, Any]:
    achieved = nbytes * tok_s / batch
    peak = next((v for k, v in PEAK_BANDWIDTH.items() if k in device_name), None)
    return {"bytes_per_step": nbytes, "achieved_GB_s": achieved / 1e9,
            "share_of_peak": None if peak is None else achieved / peak}


def measure_model(name: str, plan: dict, device: str, dtype: torch.dtype, work: Path, deadline: float,
                  device_name: str) -> dict[str, Any]:
    from server.app import build_stack, load
    from server.config import ServerConfig

    model_dir = build_model_dir(name, work / name / "model")
    adapters = work / name / "adapters"
    config = ServerConfig(model=str(model_dir), device=device, dtype=str(dtype).removeprefix("torch."),
                          kernels=plan["kernels"],
                          adapters_dir=str(adapters), kv_cache_tokens=plan["kv_tokens"], max_lora_rank=16,
                          max_device_adapters=2 * plan["distinct"] + len(KINDS) * plan["per_kind"] + 1)
    loaded = load(config)
    families = write_adapters(adapters, loaded.shape, plan)
    stack = build_stack(loaded, config)
    texts = prompts(plan["batch"], plan["prompt_len"], SHAPES[name]["vocab_size"])
    result: dict[str, Any] = {"shape": SHAPES[name], "backend": stack.deltas.methods["lora"].backend.name}
    peft_names = (families["lora-r8-qv"][:2] + families["lora-r16-all"][:2])[:len(texts) - 1]
    result["parity"] = guarded(parity, stack, model_dir, adapters, peft_names, texts, device, dtype)
    stack.engine.start()
    try:
        tok_s = engine_runs(stack, texts, families, plan)
        result["cuda_graphs"] = guarded(graph_runs, stack, texts, families, plan, tok_s)
    finally:
        stack.engine.shutdown(0)
    lora_bytes = sum(stack.store.get(n).nbytes for n in families["lora-r16-all"]) * loaded.dtype.itemsize // 4
    result["engine_tok_s"] = tok_s
    result["over_base"] = {k: v / tok_s["base"] for k, v in tok_s.items()}
    result["bandwidth"] = {"base": bandwidth(tok_s["base"], step_bytes(loaded, plan), plan["batch"], device_name),
                           "lora-r16-all": bandwidth(tok_s["lora-r16-all"], step_bytes(loaded, plan, lora_bytes),
                                                     plan["batch"], device_name)}
    del stack, loaded
    result["hf_generate_tok_s"] = hf_generate(model_dir, texts, plan, device, dtype)
    result["engine_over_hf"] = tok_s["base"] / result["hf_generate_tok_s"]
    if time.monotonic() < deadline:
        peft_tok_s = peft_generate(model_dir, adapters, families["lora-r8-qv"], texts, plan, device, dtype)
        result["peft_mixed_r8_qv_tok_s"] = peft_tok_s
        result["engine_lora_r8_qv_over_peft"] = tok_s["lora-r8-qv"] / peft_tok_s
    else:
        result["peft_mixed_r8_qv_tok_s"] = "skipped: past the time budget"
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the whole flow on CPU, tiny shapes")
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--models", default=None, help="comma-separated, of " + ", ".join(SHAPES))
    parser.add_argument("--kernels", default=None, help="force a kernel backend (torch_ref, torch_grouped, triton)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip PEFT runs once this much has passed")
    args = parser.parse_args(argv)
    from server.kernels import registry

    plan = dict(PLANS["dry" if args.dry_run else "full"])
    # The dry run takes the GPU's kernels (Triton, interpreted) so that it walks the GPU run's paths.
    plan["kernels"] = args.kernels or ("triton" if args.dry_run else "auto")
    registry.configure(None if plan["kernels"] == "auto" else plan["kernels"])
    if args.models:
        plan["models"] = tuple(args.models.split(","))
    gpu = torch.cuda.is_available() and not args.dry_run
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    device_name = torch.cuda.get_device_name(0) if gpu else "cpu"
    start = time.monotonic()
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "device": device_name,
                               "dry_run": args.dry_run, "dtype": str(dtype), "torch": torch.__version__,
                               "plan": {k: list(v) if isinstance(v, tuple) else v for k, v in plan.items()}}
    results["kernels"] = guarded(kernel_errors, device)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    results["models"] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        for name in plan["models"]:
            results["models"][name] = guarded(measure_model, name, plan, device, dtype, Path(work),
                                              start + args.budget_s, device_name)
            emit(results, False, args.out)   # what is measured so far survives a later failure
    results["seconds"] = time.monotonic() - start
    if gpu:
        results["max_memory_allocated_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    emit(results, False, args.out)
    print(f"wrote {args.out} in {results['seconds']:.0f} s; kernels pass: {results['kernels'].get('all_pass')}")
    return results


if __name__ == "__main__":
    main()
