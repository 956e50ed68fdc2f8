"""benchmarks/gpu_check.py --dry-run: the GPU check's whole flow on CPU on tiny shapes (random model from a config,
offline tokenizer, adapters of every kind, engine vs Hugging Face vs PEFT, Triton kernels interpreted), one JSON."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_writes_every_figure(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert "error" not in result["kernels"] and "error" not in result["models"]["tiny"], result
    assert result["dry_run"] and result["device"] == "cpu"
    assert result["kernels"]["all_pass"], result["kernels"]
    assert {k.split("/")[0] for k in result["kernels"] if "/" in k} == {
        "lora_decode", "lora_prefill", "bottleneck", "decode_attention"}
    tiny = result["models"]["tiny"]
    assert set(tiny["engine_tok_s"]) == {"base", "lora-r8-qv", "lora-r16-all", "all-kinds"}
    # Every figure is recorded as a number (its size is the benchmark's business, not the test's).
    figures = [*tiny["engine_tok_s"].values(), tiny["hf_generate_tok_s"], tiny["peft_mixed_r8_qv_tok_s"]]
    assert all(isinstance(v, float) and math.isfinite(v) for v in figures)
    assert tiny["bandwidth"]["lora-r16-all"]["bytes_per_step"] > tiny["bandwidth"]["base"]["bytes_per_step"]
    # Model-level parity with PEFT (fp32 here: tests/tolerance.py's bound), prefill and two decode steps.
    parity = tiny["parity"]
    assert parity["all_pass"] and parity["adapters_distinguishable"], parity.get("worst", parity)
    assert {row["round"] for row in parity["rows"]} == {0, 1, 2} and len(parity["rows"]) == 12
    # The dry run takes the GPU's kernels, interpreted, and replays its decode steps as the GPU run captures them.
    assert tiny["backend"] == "triton"
    graphs = tiny["cuda_graphs"]
    assert graphs["captures"] >= 1 and graphs["replays"] >= 1, graphs
    assert graphs["requests_with_equal_greedy_tokens"] == "4/4"   # fp32, interpreted: one arithmetic both ways
    assert set(graphs["eager_tok_s"]) == set(graphs["captured_over_eager"]) == {"base", "all-kinds"}
