"""Prefix caching in the engine: the same greedy tokens with it on and off for every method mixed in one batch,
and no block shared across adapters or across versions of one adapter (issue 11, acceptance 1 and 3)."""

from __future__ import annotations

import pytest
import torch

from server.engine.request import GenerationRequest
from tests.fixtures.hub import HUB, hub_model
from tests.fixtures.reference import parts_logits
from tests.test_chunked_prefill import NEW_TOKENS, TEXT, _requests, _run_all, _set_chunk, served  # noqa: F401


def _set_caching(engine, on: bool) -> None:
    engine.call(lambda: setattr(engine.blocks, "caching", on))


def _hit_tokens(engine) -> int:
    return engine.call(lambda: engine.blocks.hit_tokens)


def _tokens(engine, requests: list[GenerationRequest]) -> list[list[int]]:
    return [list(result.token_ids) for result in _run_all(engine, requests)]


@pytest.mark.parametrize("chunk", [16, 512])
def test_mixed_methods_give_the_same_tokens_with_prefix_caching_on_and_off(served, chunk):  # noqa: F811
    engine = served.engine
    _set_chunk(engine, chunk)
    requests = _requests()   # every method and the base model, prompts sharing leading tokens
    _set_caching(engine, False)
    try:
        cold = _tokens(engine, requests)
    finally:
        _set_caching(engine, True)
    first = _tokens(engine, requests)
    hits = _hit_tokens(engine)
    again = _tokens(engine, requests)
    assert _hit_tokens(engine) > hits   # the second pass reused blocks of the first
    assert cold == first == again


def _greedy_reference(parts: dict, ids: list[int]) -> list[int]:
    want: list[int] = []
    with torch.inference_mode():
        for _ in range(NEW_TOKENS):
            want.append(int(parts_logits(hub_model(), torch.tensor(ids + want), parts)[-1].argmax()))
    return want


def test_another_adapter_or_a_reloaded_version_reuses_none_of_the_blocks(served):  # noqa: F811
    """A prompt cached for one adapter is not reused for another, nor for a new version under the same name
    (new weights, or the same files loaded again): each gets the tokens a cold run gives, its references'."""
    engine, store = served.engine, served.running.stack.store
    tokenizer = served.running.stack.loaded.tokenizer
    prompt = "Zebras! " + TEXT[:90]   # a prompt no other test here sends
    ids = tokenizer(prompt)["input_ids"]

    def run(name: str) -> tuple[list[int], int]:
        before = _hit_tokens(engine)
        request = GenerationRequest(f"{name}-req", prompt=prompt, adapter_id=name, max_new_tokens=NEW_TOKENS,
                                    ignore_eos=True)
        tokens = _tokens(engine, [request])[0]
        return tokens, _hit_tokens(engine) - before

    store.load("reloaded", HUB / "par_bn")
    first, _ = run("reloaded")
    assert run("reloaded")[1] > 0                       # the same version reuses its blocks
    for path in (HUB / "scaled_par_bn", HUB / "seq_bn", HUB / "seq_bn"):   # new weights; then the same ones again
        store.load("reloaded", path)
        tokens, hits = run("reloaded")
        assert hits == 0, path
        assert tokens == _greedy_reference(store.get("reloaded").parts, ids), path
    for name in ("par_bn", "prefix_tuning", ""):        # other adapters, and the base model, on the same prompt
        tokens, hits = run(name)
        assert hits == 0, name or "base"
        assert tokens == _greedy_reference(store.get(name).parts if name else {}, ids), name or "base"
    assert first == _greedy_reference(store.get("par_bn").parts, ids)
