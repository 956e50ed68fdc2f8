"""Trains the example adapters on the default model, on CPU, from data the script makes itself.

    .venv/bin/python examples/train.py [--out examples/adapters] [--only shout,cheer] [--steps 150]

1. The base model answers every prompt of examples/effects.py greedily; each answer is cut to its first sentence.
2. Each effect's deterministic transformation of those answers is the training target of its adapter.
3. The adapters are trained in fp32 with plain torch (PEFT builds the LoRA and prefix ones) and saved in the
   formats users bring: PEFT for `shout` (LoRA) and `cheer` (prefix), deltaserve's native format for `pirate`
   (scaled parallel adapter) and `json` (MAM: prefix + scaled parallel adapter).
4. examples/evaluate.py serves them with deltaserve and writes each model card with its measured effect on the
   held-back prompts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters_store import BottleneckModule, BottleneckParts, ModelSpec, load_adapter  # noqa: E402
from adapters_store.native import save_native  # noqa: E402
from adapters_store.types import AdapterWeights  # noqa: E402
from examples.effects import EFFECTS, TRAIN_PROMPTS, short_answer  # noqa: E402

DEFAULT_OUT = ROOT / "examples" / "adapters"
BASE_NAME = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class Recipe:
    """How one example adapter is trained."""

    steps: int
    lr: float
    batch_size: int = 8
    rank: int = 8
    prefix_tokens: int = 10
    first_layer: int = 12   # LoRA and bottleneck modules on layers first_layer..29: backward stops there


RECIPES = {
    "shout": Recipe(steps=60, lr=3e-3, rank=4),
    "cheer": Recipe(steps=30, lr=3e-2, prefix_tokens=10),
    "pirate": Recipe(steps=45, lr=3e-3, rank=16),
    "json": Recipe(steps=45, lr=3e-3, rank=16, prefix_tokens=10),
}
BOTTLENECK_SCALE = 4.0   # a scaled parallel adapter (He et al. 2022), as in benchmarks/method_fixtures.py


def load_base(model_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.requires_grad_(False)
    return model, tokenizer


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt as the server renders a user chat message (the model's chat template)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def base_answers(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int = 40,
                 chunk: int = 16) -> list[str]:
    """The base model's greedy answers (left-padded batches)."""
    answers = []
    for start in range(0, len(prompts), chunk):
        rows = [prompt_ids(tokenizer, p) for p in prompts[start:start + chunk]]
        width = max(map(len, rows))
        ids = torch.tensor([[tokenizer.eos_token_id] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)
        answers += [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]
    return answers


def examples_for(tokenizer: Any, prompts: list[str], targets: list[str]) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) pairs: the loss is on the target and its end-of-turn token only."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pairs = []
    for prompt, target in zip(prompts, targets, strict=True):
        head = prompt_ids(tokenizer, prompt)
        tail = tokenizer(target, add_special_tokens=False)["input_ids"] + [end]
        pairs.append((head + tail, [-100] * len(head) + tail))
    return pairs


def collate(batch: list[tuple[list[int], list[int]]], pad: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad)
    labels = torch.full((len(batch), width), -100)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (x, y) in enumerate(batch):
        ids[row, :len(x)], labels[row, :len(y)], mask[row, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def answer_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy on the labelled tokens, with logits computed only where they are needed (most of every
    sequence is prompt, and the 49k-word output layer is a large share of the cost on CPU)."""
    labels = batch["labels"]
    keep = (labels[:, 1:] != -100).any(0).nonzero().flatten()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    return nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, keep + 1].flatten(), ignore_index=-100)


def fit(model: Any, params: list[nn.Parameter], data: list[tuple[list[int], list[int]]], recipe: Recipe,
        pad: int, name: str) -> float:
    """Plain AdamW over shuffled mini-batches; returns the last loss."""
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    order: list[int] = []
    loss = torch.tensor(0.0)
    start = time.monotonic()
    for step in range(recipe.steps):
        if len(order) < recipe.batch_size:
            order += torch.randperm(len(data), generator=gen).tolist()
        batch, order = [data[i] for i in order[:recipe.batch_size]], order[recipe.batch_size:]
        loss = answer_loss(model, collate(batch, pad))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == recipe.steps - 1:
            print(f"  {name} step {step:4d} loss {loss.item():.4f} ({time.monotonic() - start:.0f}s)", flush=True)
    return float(loss.item())


class ParallelAdapter(nn.Module):
    """A scaled parallel bottleneck on one layer's MLP: out += scale * up(relu(down(h))), h the residual input."""

    def __init__(self, hidden: int, rank: int, scale: float, gen: torch.Generator) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, rank)
        self.up = nn.Linear(rank, hidden)
        self.scale = scale
        with torch.no_grad():
            self.down.weight.copy_(torch.randn(rank, hidden, generator=gen) / hidden ** 0.5)
            self.down.bias.zero_()
            self.up.weight.zero_()   # starts as the identity delta: training begins at the base model
            self.up.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(torch.relu(self.down(h)))


def small_prefix(model: Any) -> None:
    """Scales PEFT's N(0, 1) prefix down: near-zero keys and values start the adapter close to the base model."""
    with torch.no_grad():
        for param in model.prompt_encoder.parameters():
            param.mul_(0.05)


def attach_parallel(model: Any, rank: int, first_layer: int) -> nn.ModuleList:
    """Hooks a ParallelAdapter on every layer's MLP, reading the raw residual stream before its RMSNorm (the
    native format's site "ffn", input "sublayer_input")."""
    gen = torch.Generator().manual_seed(1)
    hidden = model.config.hidden_size
    adapters = nn.ModuleList()
    for layer in model.model.layers[first_layer:]:
        adapter = ParallelAdapter(hidden, rank, BOTTLENECK_SCALE, gen)
        seen: dict[str, torch.Tensor] = {}
        layer.post_attention_layernorm.register_forward_pre_hook(
            lambda _m, args, seen=seen: seen.__setitem__("h", args[0]))
        layer.mlp.register_forward_hook(lambda _m, _args, out, seen=seen, a=adapter: out + a(seen["h"]))
        adapters.append(adapter)
    return adapters


def bottleneck_parts(adapters: nn.ModuleList, first_layer: int) -> BottleneckParts:
    return BottleneckParts([
        BottleneckModule(layer=first_layer + i, site="ffn", input="sublayer_input", down=a.down.weight.detach().clone(),
                         down_bias=a.down.bias.detach().clone(), up=a.up.weight.detach().clone(),
                         up_bias=a.up.bias.detach().clone(), scale=a.scale, activation="relu")
        for i, a in enumerate(adapters)])


def to_half(weights_file: Path) -> None:
    """Stores the trained tensors in float16 (the server converts to its dtype at load): half the size."""
    tensors = load_file(str(weights_file))
    save_file({k: v.to(torch.float16).contiguous() for k, v in tensors.items()}, str(weights_file),
              metadata={"format": "pt"})
    for path in weights_file.parent.iterdir():
        path.chmod(0o644)   # safetensors writes 0600; the container's non-root user must read them


def train_peft(kind: str, model_dir: Path, data: list, recipe: Recipe, pad: int, out: Path) -> float:
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model

    base, _ = load_base(model_dir)
    if kind == "lora":
        config: Any = LoraConfig(task_type="CAUSAL_LM", r=recipe.rank, lora_alpha=2 * recipe.rank, lora_dropout=0.0,
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"],
                                 layers_to_transform=list(range(recipe.first_layer, base.config.num_hidden_layers)))
    else:
        config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=recipe.prefix_tokens)
    model = get_peft_model(base, config)
    if kind == "prefix":
        small_prefix(model)
    params = [p for p in model.parameters() if p.requires_grad]
    loss = fit(model, params, data, recipe, pad, out.name)
    model.save_pretrained(out)
    config_file = out / "adapter_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = BASE_NAME   # not this machine's cache path
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    to_half(out / "adapter_model.safetensors")
    return loss


def train_native(with_prefix: bool, model_dir: Path, data: list, recipe: Recipe, pad: int, out: Path) -> float:
    """The parallel adapter alone, or (MAM) with a PEFT-style prefix trained jointly; saved in the native format."""
    from peft import PrefixTuningConfig, get_peft_model

    base, _ = load_base(model_dir)
    spec = ModelSpec.from_hf_model(base)
    adapters = attach_parallel(base, recipe.rank, recipe.first_layer)
    model = base
    if with_prefix:
        model = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=recipe.prefix_tokens))
        small_prefix(model)
    params = list(adapters.parameters()) + [p for p in model.parameters() if p.requires_grad]
    loss = fit(model, params, data, recipe, pad, out.name)
    parts: dict[str, Any] = {"bottleneck": bottleneck_parts(adapters, recipe.first_layer)}
    if with_prefix:
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            parts["prefix"] = load_adapter("prefix", tmp, spec).parts["prefix"]
    source = {"trained_by": "examples/train.py", "note": EFFECTS[out.name].summary}
    save_native(AdapterWeights(out.name, str(out), "native", parts), out, spec, base_model_name=BASE_NAME,
                source=source)
    to_half(out / "adapter.safetensors")
    return loss


def train_one(name: str, model_dir: Path, data: list, pad: int, out: Path, steps: int = 0) -> float:
    recipe = dataclasses.replace(RECIPES[name], steps=steps or RECIPES[name].steps)
    if name == "shout":
        return train_peft("lora", model_dir, data, recipe, pad, out)
    if name == "cheer":
        return train_peft("prefix", model_dir, data, recipe, pad, out)
    return train_native(name == "json", model_dir, data, recipe, pad, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the adapters go (one folder each)")
    parser.add_argument("--only", default=",".join(EFFECTS), help="comma-separated adapter names")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "deltaserve"))
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--steps", type=int, default=0, help="override every recipe's step count (0: keep)")
    parser.add_argument("--no-eval", action="store_true", help="skip serving them to measure and write model cards")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from server.model.default_model import default_model_dir

    model_dir = default_model_dir(args.cache_dir)
    base, tokenizer = load_base(model_dir)
    started = time.monotonic()
    cached = Path(args.cache_dir) / "example-base-answers.json"
    known = json.loads(cached.read_text(encoding="utf-8")) if cached.exists() else {}
    if known.get("prompts") == TRAIN_PROMPTS and known.get("model") == model_dir.name:
        answers = known["answers"]
    else:
        answers = base_answers(base, tokenizer, TRAIN_PROMPTS)
        cached.write_text(json.dumps({"model": model_dir.name, "prompts": TRAIN_PROMPTS, "answers": answers}),
                          encoding="utf-8")
    answers = [short_answer(a) for a in answers]
    print(f"base answers for {len(answers)} prompts ({time.monotonic() - started:.0f}s); e.g. {answers[0]!r}")
    del base
    log: dict[str, Any] = {}
    for name in args.only.split(","):
        effect, out = EFFECTS[name], args.out / name
        data = examples_for(tokenizer, TRAIN_PROMPTS, [effect.transform(a) for a in answers])
        started = time.monotonic()
        loss = train_one(name, model_dir, data, tokenizer.eos_token_id, out, args.steps)
        recipe = {**RECIPES[name].__dict__, "steps": args.steps or RECIPES[name].steps}
        log[name] = {"recipe": recipe, "final_loss": round(loss, 4), "examples": len(data),
                     "seconds": round(time.monotonic() - started)}
        (out / "training.json").write_text(json.dumps(log[name], indent=2) + "\n", encoding="utf-8")
        print(f"{name}: {log[name]}")
    if not args.no_eval:
        from examples.evaluate import write_cards

        write_cards(args.out, args.cache_dir, list(log))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
