"""Issue 4, acceptance 1: PEFT prefix-tuning adapters (1, 10, 30 virtual tokens, with and without
prefix_projection) mixed with base rows in one batch on the default model: logits within fp32 noise
(tests/tolerance.py) of PEFT's own forward for that adapter alone (teacher-forced), and greedy tokens equal to a
greedy loop over PEFT's forward (PEFT's generate drops the prefix under transformers 5, so it is not the oracle)."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from server.app import build_stack
from server.config import ServerConfig
from server.engine.binding import NO_ADAPTER
from server.engine.request import GenerationRequest, SamplingParams, Sequence, StoppingParams
from server.engine.scheduler import ScheduledStep
from server.model.loader import load_model
from tests.helpers import chat_ids, load_peft_adapters, peft_last_logits, run_engine
from tests.tolerance import model_logit_tolerance

pytestmark = pytest.mark.integration

CASES = [(tokens, projection) for tokens in (1, 10, 30) for projection in (False, True)]
NAMES = [f"prefix{t}{'-proj' if p else ''}" for t, p in CASES]
PROMPTS = ["What is the capital of France?", "Write a haiku about rain.", "Name two planets.", "Hello!"]
ROWS = NAMES + NAMES[::-1] + [None] * 4    # 16 rows: every adapter twice, four base rows
NEW_TOKENS = 24



@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory, default_model_dir):
    from peft import PrefixTuningConfig, get_peft_model

    root = tmp_path_factory.mktemp("peft-prefix")
    for seed, ((tokens, projection), name) in enumerate(zip(CASES, NAMES, strict=True)):
        base = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
        model = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=tokens,
                                                        prefix_projection=projection, encoder_hidden_size=32))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in model.prompt_encoder.parameters():
                param.copy_(torch.randn(param.shape, generator=gen) * (0.5 if param.dim() > 1 else 0.1))
        model.save_pretrained(root / name)
    return root


@pytest.fixture(scope="module")
def peft_model(adapters_dir, default_model_dir):
    return load_peft_adapters(default_model_dir, adapters_dir, NAMES)


@pytest.fixture(scope="module")
def stack(adapters_dir, cache_dir):
    loaded = load_model("default", cache_dir, "cpu", "float32")
    stack = build_stack(loaded, ServerConfig(adapters_dir=str(adapters_dir), kv_cache_tokens=8192))
    assert sorted(stack.store.names()) == sorted(NAMES)
    return stack


def _sequence(stack, i: int, adapter: str | None) -> Sequence:
    ids = chat_ids(stack.loaded.tokenizer, PROMPTS[i % len(PROMPTS)])
    return Sequence(request_id=f"row{i}", prompt_ids=ids, sampling=SamplingParams(), stopping=StoppingParams(8),
                    seed=0, adapter_id=adapter or "", binding=stack.slots.acquire(adapter) if adapter else NO_ADAPTER,
                    return_logprobs=False, sink=lambda o: None, arrival=0.0)


def test_mixed_batch_logits_match_peft_forward(stack, peft_model):
    seqs = [_sequence(stack, i, adapter) for i, adapter in enumerate(ROWS)]
    step = ScheduledStep(prefills=list(seqs))
    for round_ in range(3):  # prefill, then two decode steps
        for seq in seqs:
            stack.engine.blocks.allocate(seq)
        ordered, logits = stack.engine.runner.run(step)
        for seq, row in zip(ordered, logits, strict=True):
            want = peft_last_logits(peft_model, seq.adapter_id or None, seq.all_ids)
            diff, tol = (row - want).abs().max().item(), model_logit_tolerance(stack.loaded.shape, want, len(seq))
            assert diff < tol, f"round {round_}, {seq.adapter_id or 'base'}: max |diff| {diff:.2e} > {tol:.2e}"
            if seq.adapter_id:
                assert (want - peft_last_logits(peft_model, None, seq.all_ids)).abs().max().item() > 20 * tol
            seq.output_ids.append(int(want.argmax()))
        step = ScheduledStep(decodes=list(seqs))
    for seq in seqs:
        stack.engine.blocks.free(seq)
        stack.slots.release(seq.binding)


def test_concurrent_greedy_equals_greedy_loop_over_peft_forward(stack, peft_model):
    engine = stack.engine
    engine.start()
    try:
        results: dict[int, list[int]] = {}

        def one(i: int, adapter: str | None) -> None:
            request = GenerationRequest(f"g{i}", messages=(("user", PROMPTS[i % len(PROMPTS)]),),
                                        adapter_id=adapter or "", max_new_tokens=NEW_TOKENS, ignore_eos=True)
            results[i] = run_engine(engine, request)[0].token_ids

        threads = [threading.Thread(target=one, args=(i, a)) for i, a in enumerate(ROWS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i in [*range(len(NAMES)), len(ROWS) - 1]:  # every adapter once, and a base row
            adapter = ROWS[i]
            ids = chat_ids(stack.loaded.tokenizer, PROMPTS[i % len(PROMPTS)])
            want: list[int] = []
            for _ in range(NEW_TOKENS):
                want.append(int(peft_last_logits(peft_model, adapter, ids + want).argmax()))
            assert results[i] == want, f"row {i} ({adapter or 'base'})"
    finally:
        engine.shutdown(0)
