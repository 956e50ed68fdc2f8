"""Issue 4, acceptance 2: AdapterHub adapters (parallel, scaled, sequential, attention-site, Houlsby,
prefix, MAM) served in one mixed batch with base rows give AdapterHub's own logits (committed fixtures
made by tests/fixtures/make_adapterhub_fixtures.py with adapters 1.3), teacher-forced through prefill
and decode steps."""

from __future__ import annotations

import shutil

import pytest

from server.app import build_stack
from server.config import ServerConfig
from server.engine.binding import NO_ADAPTER
from server.engine.request import SamplingParams, Sequence, StoppingParams
from server.engine.scheduler import ScheduledStep
from server.model.loader import load_model
from tests.fixtures.hub import ADAPTERS, HUB, MODEL_DIR, NUM_INPUTS, expected
from tests.tolerance import model_logit_tolerance

PROMPT_TOKENS = 2  # prefilled; the rest of each fixture input is fed one decode step at a time


@pytest.fixture(scope="module")
def stack(tmp_path_factory, default_model_dir, cache_dir):
    root = tmp_path_factory.mktemp("hub")
    model_dir = shutil.copytree(MODEL_DIR, root / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # ids only are used; the loader wants one
        shutil.copy(default_model_dir / name, model_dir / name)
    for name in ADAPTERS:
        shutil.copytree(HUB / name, root / "adapters" / name)
    loaded = load_model(str(model_dir), cache_dir, "cpu", "float32")
    config = ServerConfig(adapters_dir=str(root / "adapters"), kv_cache_tokens=4096, block_size=4,
                          max_model_len=64, max_batch_size=64)
    stack = build_stack(loaded, config)
    assert sorted(stack.store.names()) == sorted(ADAPTERS)
    return stack


def _sequence(stack, adapter: str | None, index: int) -> Sequence:
    ids = expected()[f"input_ids.{index}"].tolist()
    binding = stack.slots.acquire(adapter) if adapter else NO_ADAPTER
    seq = Sequence(request_id=f"{adapter}.{index}", prompt_ids=ids[:PROMPT_TOKENS], sampling=SamplingParams(),
                   stopping=StoppingParams(64), seed=0, adapter_id=adapter or "", binding=binding,
                   return_logprobs=False, sink=lambda o: None, arrival=0.0)
    seq.fixture = (adapter or "base", index, ids)  # type: ignore[attr-defined]
    return seq


def test_every_adapter_in_one_mixed_batch_matches_adapterhub(stack):
    want = expected()
    running = [_sequence(stack, adapter, i) for adapter in (None, *ADAPTERS) for i in range(NUM_INPUTS)]
    step = ScheduledStep(prefills=list(running))
    checked = 0
    while step.sequences:
        for seq in step.sequences:
            stack.engine.blocks.allocate(seq)
        seqs, logits = stack.engine.runner.run(step)
        for seq, row in zip(seqs, logits, strict=True):
            name, index, ids = seq.fixture
            position = len(seq) - 1
            reference = want[f"{name}.{index}"][position]
            tol = model_logit_tolerance(stack.loaded.shape, reference, len(ids))
            diff = (row - reference).abs().max().item()
            assert diff < tol, f"{name} input {index} position {position}: max |diff| {diff:.2e} > {tol:.2e}"
            checked += 1
            if len(seq) < len(ids):
                seq.output_ids.append(ids[len(seq)])  # teacher forcing
        step = ScheduledStep(decodes=[s for s in seqs if len(s) > s.num_cached])
    assert checked == (1 + len(ADAPTERS)) * sum(len(want[f"input_ids.{i}"]) - PROMPT_TOKENS + 1
                                                 for i in range(NUM_INPUTS))
