"""Our batched forward over the paged KV cache equals Hugging Face's forward (tiny random Llama)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from server.app import build_engine
from server.config import ServerConfig
from server.engine.request import SamplingParams, Sequence, StoppingParams
from server.engine.scheduler import ScheduledStep
from server.model.loader import load_model
from tests.tolerance import model_logit_tolerance


def _sequence(name: str, ids: list[int]) -> Sequence:
    return Sequence(request_id=name, prompt_ids=ids, sampling=SamplingParams(), stopping=StoppingParams(8),
                    seed=0, adapter_id="", return_logprobs=False, sink=lambda o: None,
                    arrival=0.0)


def test_mixed_prefill_and_decode_match_hf(tiny_model_dir, cache_dir):
    loaded = load_model(str(tiny_model_dir), cache_dir, "cpu", "float32")
    engine = build_engine(loaded, ServerConfig(kv_cache_tokens=1024, block_size=4))
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(1)
    vocab = loaded.shape.vocab_size

    def rand_ids(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    def reference(ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return hf(torch.tensor([ids])).logits[0, -1]

    running = [_sequence(f"s{i}", rand_ids(n)) for i, n in enumerate((5, 9, 13))]
    step = ScheduledStep(prefills=list(running))
    for round_ in range(6):
        for seq in step.sequences:
            engine.blocks.allocate(seq)
        seqs, logits = engine.runner.run(step)
        for seq, row in zip(seqs, logits, strict=True):
            want = reference(seq.all_ids)
            diff, tol = (row - want).abs().max().item(), model_logit_tolerance(loaded.shape, want, len(seq))
            assert diff < tol, f"round {round_} {seq.request_id}: max |diff| {diff:.2e} > {tol:.2e}"
            seq.output_ids.append(rand_ids(1)[0])
        # A new prompt joins while the others decode, every other round.
        joining = [_sequence(f"j{round_}", rand_ids(3 + round_))] if round_ % 2 == 0 else []
        running += joining
        step = ScheduledStep(prefills=joining, decodes=[s for s in running if s not in joining])
