"""The engine on a tiny random Llama: greedy parity, continuous batching, preemption, cancel, limits."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from server.app import build_engine
from server.config import ServerConfig
from server.engine.errors import InvalidRequest, UnknownAdapter
from server.engine.request import FinishReason, GenerationRequest, SamplingParams
from server.model.loader import load_model
from tests.helpers import run_engine

PROMPTS = ["Hello there", "The quick brown fox jumps over", "1 2 3 4 5 6 7 8 9", "Why is the sky blue?",
           "Once upon a time, in a land far away, there lived", "a", "Paris is", "def main():"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, cache_dir):
    return load_model(str(tiny_model_dir), cache_dir, "cpu", "float32")


@pytest.fixture(scope="module")
def hf_tiny(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def _engine(tiny, **overrides):
    config = ServerConfig(**{"kv_cache_tokens": 4096, "block_size": 8, **overrides})
    engine = build_engine(tiny, config)
    engine.start()
    return engine


def _hf_greedy(hf, tokenizer, prompt: str, n: int) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = hf.generate(**ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, ids["input_ids"].shape[1]:].tolist()


def _generate_all(engine, requests):
    results: dict[str, object] = {}
    threads = [threading.Thread(target=lambda r=r: results.__setitem__(r.request_id, run_engine(engine, r)[0]))
               for r in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [results[r.request_id] for r in requests]


def test_greedy_alone_and_concurrent_equal_hf(tiny, hf_tiny):
    engine = _engine(tiny)
    try:
        expected = [_hf_greedy(hf_tiny, tiny.tokenizer, p, 24) for p in PROMPTS]
        for prompt, want in zip(PROMPTS, expected, strict=True):
            got, _ = run_engine(engine, GenerationRequest(f"alone-{prompt}", prompt=prompt, max_new_tokens=24,
                                                          ignore_eos=True))
            assert got.token_ids == want
        requests = [GenerationRequest(f"c{i}", prompt=p, max_new_tokens=24, ignore_eos=True)
                    for i, p in enumerate(PROMPTS * 2)]
        for result, want in zip(_generate_all(engine, requests), expected * 2, strict=True):
            assert result.token_ids == want
            assert result.finish_reason is FinishReason.LENGTH
    finally:
        engine.shutdown(0)


def test_preemption_keeps_outputs_exact(tiny, hf_tiny):
    # 12 blocks of 8 tokens cannot hold 8 sequences of ~40 tokens: the scheduler must preempt.
    engine = _engine(tiny, kv_cache_tokens=96, block_size=8, max_model_len=96)
    try:
        requests = [GenerationRequest(f"p{i}", prompt=p, max_new_tokens=24, ignore_eos=True)
                    for i, p in enumerate(PROMPTS)]
        results = _generate_all(engine, requests)
        for prompt, result in zip(PROMPTS, results, strict=True):
            assert result.token_ids == _hf_greedy(hf_tiny, tiny.tokenizer, prompt, 24)
        assert engine.blocks.num_free == engine.blocks.num_blocks
    finally:
        engine.shutdown(0)


def test_cancel_frees_blocks_and_spares_others(tiny):
    engine = _engine(tiny)
    try:
        started = threading.Event()
        victim = engine.submit(GenerationRequest("victim", prompt="Hello", max_new_tokens=400, ignore_eos=True),
                               lambda out: started.set())
        assert started.wait(60)
        victim.cancel()
        other, _ = run_engine(engine, GenerationRequest("other", prompt="Hello", max_new_tokens=5,
                                                        ignore_eos=True))
        assert len(other.token_ids) == 5
        assert engine.blocks.num_free == engine.blocks.num_blocks
        assert engine.call(engine.stats).running == 0   # the snapshot published after the step that ended it
    finally:
        engine.shutdown(0)


def test_seeded_sampling_is_reproducible(tiny):
    engine = _engine(tiny)
    try:
        sampling = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234)
        texts = [run_engine(engine, GenerationRequest(f"s{i}", prompt="Tell me", sampling=sampling,
                                                      max_new_tokens=16, ignore_eos=True))[0].token_ids
                 for i in range(2)]
        assert texts[0] == texts[1]
        other = SamplingParams(temperature=1.0, seed=99)
        third = run_engine(engine, GenerationRequest("s3", prompt="Tell me", sampling=other, max_new_tokens=16,
                                                     ignore_eos=True))[0]
        assert third.token_ids != texts[0]
        assert third.seed == 99
    finally:
        engine.shutdown(0)


@pytest.mark.parametrize(("request_kwargs", "message"), [
    ({"prompt": ""}, "prompt is empty"),
    ({"prompt": "hi", "max_new_tokens": 10**6}, "exceeds the context"),
    ({"prompt": "hi " * 600}, "the context holds"),
    ({"prompt": "hi", "sampling": SamplingParams(temperature=-1)}, "temperature"),
    ({"prompt": "hi", "sampling": SamplingParams(top_p=1.5)}, "top_p"),
    ({"prompt": "hi", "sampling": SamplingParams(repetition_penalty=-2)}, "repetition_penalty"),
    ({"messages": ()}, "no messages"),
    ({"messages": (("wizard", "hi"),)}, "unknown chat role"),
    ({"prompt": "hi", "stop_sequences": ("",)}, "stop sequences"),
])
def test_bad_requests_are_refused(tiny, request_kwargs, message):
    engine = _engine(tiny, max_model_len=512)
    try:
        with pytest.raises(InvalidRequest, match=message):
            engine.submit(GenerationRequest("bad", **request_kwargs), lambda out: None)
        with pytest.raises(UnknownAdapter):
            engine.submit(GenerationRequest("bad", prompt="hi", adapter_id="nope"), lambda out: None)
        ok, _ = run_engine(engine, GenerationRequest("ok", prompt="hi", max_new_tokens=3, ignore_eos=True))
        assert len(ok.token_ids) == 3
    finally:
        engine.shutdown(0)


def test_stop_sequence_truncates_text(tiny):
    engine = _engine(tiny)
    try:
        full, _ = run_engine(engine, GenerationRequest("f", prompt="Hello", max_new_tokens=30, ignore_eos=True))
        assert len(full.text) > 6
        stop = full.text[3:6]
        cut, outputs = run_engine(engine, GenerationRequest("c", prompt="Hello", max_new_tokens=30,
                                                            ignore_eos=True, stop_sequences=(stop,)))
        assert cut.finish_reason is FinishReason.STOP_SEQUENCE
        assert cut.text == full.text[:full.text.find(stop)]
        assert "".join(o.text for o in outputs) == cut.text
    finally:
        engine.shutdown(0)


def test_engine_thread_alone_claims_the_compute_threads(tiny):
    engine = _engine(tiny, threads=2)
    try:
        assert engine.call(torch.get_num_threads) == 2
        later: list[int] = []
        thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert later == [1]          # threads started after the engine's take one torch thread
        with pytest.raises(ZeroDivisionError):
            engine.call(lambda: 1 / 0)
        result, _ = run_engine(engine, GenerationRequest("after-call", prompt="Hello", max_new_tokens=3))
        assert len(result.token_ids) == 3
    finally:
        engine.shutdown(0)
