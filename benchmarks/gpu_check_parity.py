"""Model-level parity for the GPU check: the engine's logits against PEFT's, on the same random-weight model and
LoRA adapters, in the serving dtype (bf16 on a GPU), over a prefill step and two decode steps (replayed CUDA graphs
where the engine captures them).

The oracle is PEFT in fp32 on the same weights: the serving-dtype weights and adapters upcast, so rounding the
weights is no error of either side (the engine folds a LoRA's scale into B before rounding it, PEFT scales after:
a rounding of the size of those the criterion compares). A bf16 forward rounds its activations after every
operation, so its logits differ from the fp32 ones by far more than any fp32 bound (tests/tolerance.py's model gives
2·λ·L·√n·2⁻⁸ ≈ 45·max|logit| for the 1B shape: vacuous). The criterion is relative instead: the engine computes the
same arithmetic as PEFT's bf16 forward with the same roundings (fp32 accumulation in its kernels, one rounding into
each bf16 output), so its error against fp32 is of the same size as PEFT-bf16's own; `pass` allows twice it, per
row. In fp32 (the dry run) PEFT's error is 0 and the fp32 tolerance of tests/tolerance.py applies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from server.engine.binding import NO_ADAPTER
from server.engine.request import SamplingParams, Sequence, StoppingParams
from server.engine.scheduler import ScheduledStep
from tests.tolerance import model_logit_tolerance

RATIO = 2.0


def peft_model(model_dir: Path, adapters: Path, names: list[str], device: str, weights: torch.dtype,
               compute: torch.dtype) -> Any:
    """PEFT holding every named adapter, its weights rounded to `weights` (the serving dtype: the numbers the engine
    holds) and computing in `compute`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=weights)
    model = PeftModel.from_pretrained(base, adapters / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters / name, adapter_name=name)
    return model.to(dtype=weights).to(device=device, dtype=compute).eval()


def peft_logits(model: Any, adapter: str, ids: list[int], device: str) -> torch.Tensor:
    """The last position's logits [vocab] in fp32; adapter '' = the base model."""
    with torch.inference_mode():
        inputs = torch.tensor([ids], device=device)
        if not adapter:
            with model.disable_adapter():
                return model(input_ids=inputs).logits[0, -1].float()
        model.set_adapter(adapter)
        return model(input_ids=inputs).logits[0, -1].float()


def _sequences(stack: Any, rows: list[tuple[str, list[int]]]) -> list[Sequence]:
    return [Sequence(request_id=f"parity-{i}", prompt_ids=list(ids), sampling=SamplingParams(),
                     stopping=StoppingParams(8), seed=0, adapter_id=name, return_logprobs=False,
                     sink=lambda o: None, arrival=0.0,
                     binding=stack.slots.acquire(name) if name else NO_ADAPTER)
            for i, (name, ids) in enumerate(rows)]


def parity(stack: Any, model_dir: Path, adapters: Path, names: list[str], texts: list[str], device: str,
           dtype: torch.dtype) -> dict[str, Any]:
    """Runs before the engine thread starts (the caller owns the runner). Rows: the base model and each adapter."""
    tokenizer, shape = stack.loaded.tokenizer, stack.loaded.shape
    reference = peft_model(model_dir, adapters, names, device, dtype, torch.float32)
    low = peft_model(model_dir, adapters, names, device, dtype, dtype) if dtype != torch.float32 else reference
    rows_in = ["", *names]
    seqs = _sequences(stack, [(name, tokenizer(text)["input_ids"]) for name, text in zip(rows_in, texts[:len(rows_in)],
                                                                                       strict=True)])
    step, rows = ScheduledStep(prefills=list(seqs)), []
    try:
        for round_ in range(3):   # the prefill step, then two decode steps
            for seq in seqs:
                stack.engine.blocks.allocate(seq)
            ordered, logits = stack.engine.runner.run(step)
            for seq, ours in zip(ordered, logits.float(), strict=True):
                want = peft_logits(reference, seq.adapter_id, seq.all_ids, device)
                peft_err = (peft_logits(low, seq.adapter_id, seq.all_ids, device) - want).abs().max().item()
                ours_err = (ours - want).abs().max().item()
                allowed = max(RATIO * peft_err, model_logit_tolerance(shape, want, len(seq)))
                moved = (want - peft_logits(reference, "", seq.all_ids, device)).abs().max().item()
                rows.append({"round": round_, "adapter": seq.adapter_id or "base", "engine_error": ours_err,
                             "peft_error": peft_err, "allowed": allowed, "adapter_moves_logits_by": moved,
                             "pass": ours_err <= allowed})
                seq.output_ids.append(int(want.argmax()))
            step = ScheduledStep(decodes=list(seqs))
    finally:
        for seq in seqs:
            stack.engine.blocks.free(seq)
            stack.slots.release(seq.binding)
    worst = max(rows, key=lambda r: r["engine_error"] / r["allowed"])
    # The comparison can tell: each adapter moves its logits by more than 20 times what is allowed.
    telling = all(r["adapter_moves_logits_by"] > 20 * r["allowed"] for r in rows if r["adapter"] != "base")
    return {"criterion": f"engine error vs PEFT fp32 <= {RATIO} x PEFT {dtype} error (fp32: tests/tolerance.py)",
            "all_pass": all(r["pass"] for r in rows), "adapters_distinguishable": telling, "worst": worst,
            "rows": rows}
