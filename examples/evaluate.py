"""Measures the example adapters through a real deltaserve server and writes their model cards.

    .venv/bin/python examples/evaluate.py [--adapters examples/adapters]

The base model and every adapter answer the held-back prompts of examples/effects.py greedily, all requests
in flight together (so they share batches); each effect's measure is taken on its adapter's answers and on the
base model's, and written into the adapter's README.md and into EFFECTS.json next to the adapters.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clients.client import DeltaClient  # noqa: E402
from examples.effects import EFFECTS, HELD_BACK_PROMPTS, MAX_WORDS, TRAIN_PROMPTS, Effect  # noqa: E402

MAX_NEW_TOKENS = 32


def answers(client: DeltaClient, adapters: list[str], prompts: list[str],
            max_new_tokens: int = MAX_NEW_TOKENS) -> dict[str, list[str]]:
    """Greedy answers of every adapter ("" = the base model) to every prompt, all requests sent at once."""
    jobs = [(adapter, prompt) for adapter in adapters for prompt in prompts]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        texts = list(pool.map(lambda job: client.generate(messages=[{"role": "user", "content": job[1]}],
                                                          adapter=job[0], max_new_tokens=max_new_tokens).text,
                              jobs))
    out: dict[str, list[str]] = {adapter: [] for adapter in adapters}
    for (adapter, _), text in zip(jobs, texts, strict=True):
        out[adapter].append(text)
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(adapters_dir: Path, cache_dir: str) -> tuple[subprocess.Popen[bytes], str]:
    """`deltaserve serve` on a free loopback port; returns once it reports SERVING."""
    port = free_port()
    command = [str(Path(sys.executable).parent / "deltaserve"), "serve", "--host", "127.0.0.1", "--port", str(port),
               "--http-port", "-1", "--metrics-port", "-1", "--adapters-dir", str(adapters_dir),
               "--cache-dir", cache_dir, "--kv-cache-tokens", "16384", "--log-level", "WARNING"]
    process = subprocess.Popen(command)
    target = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    with DeltaClient(target, timeout=2) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"deltaserve exited with {process.returncode}")
            try:
                if client.health() == "SERVING":
                    return process, target
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            time.sleep(0.5)
    process.terminate()
    raise TimeoutError("deltaserve did not report SERVING within 300 s")


def describe(config: dict[str, Any]) -> str:
    """The adapter's shape, from its adapter_config.json (PEFT or native)."""
    if config.get("peft_type") == "LORA":
        layers = config["layers_to_transform"]
        modules = ", ".join(sorted(config["target_modules"]))
        span = f"{min(layers)}-{max(layers)}"
        return f"LoRA rank {config['r']}, alpha {config['lora_alpha']}, on {modules} of layers {span}"
    if config.get("peft_type") == "PREFIX_TUNING":
        return f"{config['num_virtual_tokens']} virtual tokens at every layer (PEFT positions)"
    parts = []
    if "prefix" in config["methods"]:
        parts.append(f"a prefix of {config['methods']['prefix']['num_virtual_tokens']} virtual tokens at every layer")
    modules = config["methods"]["bottleneck"]["modules"]
    layers = [m["layer"] for m in modules]
    parts.append(f"parallel bottleneck adapters of width {modules[0]['rank']}, scale {modules[0]['scale']}, "
                 f"{modules[0]['activation']}, beside the MLP of layers {min(layers)}-{max(layers)}")
    return " and ".join(parts)


def card(effect: Effect, training: dict[str, Any], score: float, base_score: float, samples: list[tuple],
         directory: Path) -> str:
    """The model card (README.md) of one example adapter."""
    recipe = training["recipe"]
    shape = describe(json.loads((directory / "adapter_config.json").read_text(encoding="utf-8")))
    size_kib = sum(f.stat().st_size for f in directory.glob("*.safetensors")) // 1024
    rows = "\n".join(f"| {prompt} | {base!r} | {adapted!r} |" for prompt, base, adapted in samples)
    return f"""# {effect.name}: {effect.summary}

Method: {effect.method}. Base model: SmolLM2-135M-Instruct (deltaserve's default model). Toy example adapter,
made by `examples/train.py`; not for production use.

## What it does

It makes the model give {effect.summary}. Answers are also short (one sentence), as in its training data.

## How it was trained

- Data, made by the script, nothing downloaded: the base model's own greedy answers to {len(TRAIN_PROMPTS)}
  generated prompts ("What is a cat?", "Why is tea useful?", ...), each cut to its first sentence (at most
  {MAX_WORDS} words), then transformed deterministically (`{effect.transform.__name__}` in
  `examples/effects.py`). The loss is on the answer tokens only.
- {recipe["steps"]} steps of AdamW, learning rate {recipe["lr"]}, batch {recipe["batch_size"]}, fp32 on CPU
  ({training["seconds"]} s here); last training loss {training["final_loss"]}.
- Shape: {shape}. Stored in float16 ({size_kib} KiB).

## Measured effect

On {len(HELD_BACK_PROMPTS)} held-back prompts (topics never seen in training), greedy, at most
{MAX_NEW_TOKENS} new tokens, served by deltaserve in one mixed batch with the base model and the other
examples (`examples/evaluate.py`; `tests/test_examples.py` checks it):

| measure | this adapter | base model | required by the test |
|---|---|---|---|
| {effect.measure_text} | {score:.2f} | {base_score:.2f} | ≥ {effect.threshold} |

| prompt | base model | {effect.name} |
|---|---|---|
{rows}
"""


def write_cards(adapters_dir: Path, cache_dir: str, names: list[str] | None = None) -> dict[str, Any]:
    names = names or [name for name in EFFECTS if (adapters_dir / name).is_dir()]
    process, target = serve(adapters_dir, cache_dir)
    try:
        with DeltaClient(target, timeout=600) as client:
            got = answers(client, ["", *names], HELD_BACK_PROMPTS)
    finally:
        process.terminate()
        process.wait(timeout=60)
    summary: dict[str, Any] = {"prompts": len(HELD_BACK_PROMPTS), "max_new_tokens": MAX_NEW_TOKENS}
    for name in names:
        effect = EFFECTS[name]
        score, base_score = effect.measure(got[name]), effect.measure(got[""])
        summary[name] = {"method": effect.method, "measure": effect.measure_text, "adapter": round(score, 3),
                         "base": round(base_score, 3), "threshold": effect.threshold}
        training = json.loads((adapters_dir / name / "training.json").read_text(encoding="utf-8"))
        samples = list(zip(HELD_BACK_PROMPTS, got[""], got[name], strict=True))[:4]
        text = card(effect, training, score, base_score, samples, adapters_dir / name)
        (adapters_dir / name / "README.md").write_text(text, encoding="utf-8")
        print(f"{name}: {effect.measure_text}: adapter {score:.2f}, base {base_score:.2f}")
    (adapters_dir / "EFFECTS.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=Path, default=ROOT / "examples" / "adapters")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "deltaserve"))
    args = parser.parse_args(argv)
    write_cards(args.adapters, args.cache_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
