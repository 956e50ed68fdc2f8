"""Chunked prefill: base, LoRA, PEFT prefix, AdapterHub prefix, parallel, sequential and MAM requests mixed in one
engine get the same greedy tokens whatever --max-prefill-chunk is, and those tokens are their references'."""

from __future__ import annotations

import threading

import pytest
import torch

from server.engine.request import GenerationRequest, GenerationResult, RequestOutput
from tests.fixtures.hub import hub_model
from tests.fixtures.mixed import mixed_server
from tests.fixtures.reference import parts_logits

ADAPTERS = ("peft-lora", "peft-prefix", "prefix_tuning", "par_bn", "seq_bn", "mam")
NEW_TOKENS = 6
# Byte-level prompts (one token per byte) up to 100 tokens: the fixture model has 128 positions.
TEXT = "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. 0123456789 "
PROMPTS = [TEXT[:100], TEXT[:37], TEXT[5:90], TEXT[:3], TEXT[20:100], TEXT[:64], TEXT[1:18]]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("chunked")
    with mixed_server(root, ("prefix_tuning", "par_bn", "seq_bn", "mam"), kv_cache_tokens=8192,
                      max_model_len=128) as server:
        yield server


def _requests() -> list[GenerationRequest]:
    """Every adapter (and the base model) with every prompt, so long and short prompts of each are read at once."""
    return [GenerationRequest(f"{name or 'base'}-{i}", prompt=prompt, adapter_id=name, max_new_tokens=NEW_TOKENS,
                              ignore_eos=True)
            for name in ("", *ADAPTERS) for i, prompt in enumerate(PROMPTS)]


def _run_all(engine, requests: list[GenerationRequest]) -> list[GenerationResult]:
    """Submits every request at once (the engine held meanwhile, so all arrive before the first step)."""
    results: dict[int, GenerationResult] = {}
    done = threading.Event()

    def sink_for(index: int):  # noqa: ANN202
        def sink(out: RequestOutput) -> None:
            if out.finished:
                results[index] = out.result   # None if it failed: the comparison below says which
                if len(results) == len(requests):
                    done.set()
        return sink

    def submit_all() -> None:
        for index, request in enumerate(requests):
            engine.submit(request, sink_for(index))

    engine.call(submit_all)   # on the engine thread: its commands run before the next step
    assert done.wait(600), f"{len(requests) - len(results)} requests did not finish"
    assert all(results[i] is not None for i in range(len(requests)))
    return [results[i] for i in range(len(requests))]


def _set_chunk(engine, size: int) -> None:
    engine.call(lambda: setattr(engine.scheduler, "max_prefill_chunk", size))


def test_mixed_methods_give_the_same_tokens_for_every_chunk_size(served):
    engine = served.engine
    requests = _requests()
    outputs = {}
    for size in (16, 128, 512):
        _set_chunk(engine, size)
        outputs[size] = [list(result.token_ids) for result in _run_all(engine, requests)]
    assert outputs[16] == outputs[128] == outputs[512]
    # And they are the references' (a plain forward applying each method's equations, greedy).
    store, tokenizer = served.running.stack.store, served.running.stack.loaded.tokenizer
    for request, got in zip(requests, outputs[16], strict=True):
        parts = store.get(request.adapter_id).parts if request.adapter_id else {}
        ids = tokenizer(request.prompt)["input_ids"]
        want: list[int] = []
        with torch.inference_mode():
            for _ in range(NEW_TOKENS):
                want.append(int(parts_logits(hub_model(), torch.tensor(ids + want), parts)[-1].argmax()))
        assert got == want, request.request_id


def test_a_prompt_is_read_over_several_steps_beside_the_decodes(served):
    """With a 16-token chunk, a 100-token prompt takes several steps, and a running stream gets a token in each."""
    engine = served.engine
    _set_chunk(engine, 16)
    sampled: list[int] = []   # rows that sampled a token, per step
    # A prompt no earlier request sent: none of it is in the prefix cache, so all of it is read.
    long_request = GenerationRequest("long", prompt=PROMPTS[0][::-1], max_new_tokens=1, ignore_eos=True)
    stream_started = threading.Event()
    finished = threading.Event()

    def stream_sink(out: RequestOutput) -> None:
        stream_started.set()

    engine.submit(GenerationRequest("stream", prompt=PROMPTS[3], max_new_tokens=80, ignore_eos=True), stream_sink)
    assert stream_started.wait(60)
    engine.on_step = lambda seqs: sampled.append(len(seqs))
    try:
        engine.submit(long_request, lambda out: finished.set() if out.finished else None)
        assert finished.wait(60)
    finally:
        engine.on_step = None
    # ceil(100 / 16) = 7 steps read the prompt; the stream decoded in each, the last one also sampled "long".
    assert len(sampled) >= 7
    assert all(count >= 1 for count in sampled)
