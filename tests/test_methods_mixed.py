"""Issue 4, acceptance 3: one batch holding base, LoRA, PEFT-prefix, AdapterHub-prefix, parallel,
sequential, attention-site, Houlsby and MAM requests, plus a native adapter combining LoRA, a parallel
adapter and a prefix: every row equals its single-adapter reference (a plain forward applying the
paper's equations, itself checked against PEFT and AdapterHub in the store tests) — in the engine and
through gRPC."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from adapters_store.native import save_native
from adapters_store.types import AdapterWeights
from deltaserve.v1 import generation_pb2 as pb
from server.engine.binding import NO_ADAPTER
from server.engine.request import SamplingParams, Sequence, StoppingParams
from server.engine.scheduler import ScheduledStep
from tests.fixtures.hub import ADAPTERS, hub_model
from tests.fixtures.mixed import mixed_server
from tests.fixtures.reference import parts_logits
from tests.tolerance import model_logit_tolerance

PROMPTS = ["abc", "hello world", "The quick brown fox", "x", "0123456789", "deltaserve!"]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    with mixed_server(root, ADAPTERS, kv_cache_tokens=4096, max_model_len=64) as server:
        store = server.running.stack.store
        combo = {"lora": store.get("peft-lora").parts["lora"], **store.get("mam").parts}
        save_native(AdapterWeights("combo", "", "native", combo), root / "combo")
        store.load("combo", root / "combo")
        yield server


def _names(server) -> list[str]:
    return sorted(server.running.stack.store.names())


def test_every_method_in_one_batch_matches_its_reference(served):
    """Prefix rows reach their adapter's keys/values through shared KV blocks in their block tables."""
    _check_one_batch(served.running.stack)


def _check_one_batch(stack) -> None:
    tokenizer = stack.loaded.tokenizer
    names = [None, *sorted(stack.store.names())]
    assert len(names) == 1 + len(ADAPTERS) + 3
    seqs = []
    for i, name in enumerate(names):
        ids = tokenizer(PROMPTS[i % len(PROMPTS)])["input_ids"]
        binding = stack.slots.acquire(name) if name else NO_ADAPTER
        seqs.append(Sequence(request_id=f"r{i}", prompt_ids=ids, sampling=SamplingParams(),
                             stopping=StoppingParams(8), seed=0, adapter_id=name or "", binding=binding,
                             return_logprobs=False, sink=lambda o: None, arrival=0.0))
    step = ScheduledStep(prefills=list(seqs))
    for round_ in range(4):
        for seq in seqs:
            stack.engine.blocks.allocate(seq)
        ordered, logits = stack.engine.runner.run(step)
        for seq, row in zip(ordered, logits, strict=True):
            parts = stack.store.get(seq.adapter_id).parts if seq.adapter_id else {}
            with torch.inference_mode():
                want = parts_logits(hub_model(), torch.tensor(seq.all_ids), parts)[-1]
            diff, tol = (row - want).abs().max().item(), model_logit_tolerance(stack.loaded.shape, want, len(seq))
            assert diff < tol, f"round {round_}, {seq.adapter_id or 'base'}: max |diff| {diff:.2e} > {tol:.2e}"
            seq.output_ids.append(int(want.argmax()))
        step = ScheduledStep(decodes=list(seqs))
    for seq in seqs:
        stack.engine.blocks.free(seq)
        stack.slots.release(seq.binding)


def test_every_method_concurrently_through_grpc(served):
    stack = served.running.stack
    names = ["", *_names(served)]

    def call(i: int) -> pb.GenerateResponse:
        return served.stub.Generate(pb.GenerateRequest(
            text=PROMPTS[i % len(PROMPTS)], adapter_id=names[i],
            stopping=pb.StoppingCriteria(max_new_tokens=NEW_TOKENS, ignore_eos=True)))

    with ThreadPoolExecutor(len(names)) as pool:
        responses = list(pool.map(call, range(len(names))))
    for i, (name, response) in enumerate(zip(names, responses, strict=True)):
        ids = stack.loaded.tokenizer(PROMPTS[i % len(PROMPTS)])["input_ids"]
        parts = stack.store.get(name).parts if name else {}
        want: list[int] = []
        with torch.inference_mode():
            for _ in range(NEW_TOKENS):
                want.append(int(parts_logits(hub_model(), torch.tensor(ids + want), parts)[-1].argmax()))
        assert list(response.token_ids) == want, name or "base"
