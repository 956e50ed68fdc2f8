"""Fuzzing request validation and detokenization with hypothesis (bounded: a few seconds each).

Requests: random GenerateRequest field values, through the gRPC translation and the engine's submission checks,
are either accepted or refused with a domain error (InvalidRequest, UnknownAdapter, Overloaded) whose message is
short — never another exception. Detokenizer: random token ids streamed one at a time never yield broken UTF-8
(no replacement character that the whole text does not have, no lone surrogate), and the streamed deltas add up
to the text of all the ids decoded at once."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deltaserve.v1 import generation_pb2 as pb
from server.app import build_stack
from server.config import ServerConfig
from server.engine.detokenizer import CONTEXT_TOKENS, IncrementalDetokenizer
from server.engine.errors import InvalidRequest, Overloaded, UnknownAdapter
from server.model.loader import load_model
from server.service.convert import request_from_proto
from tests.fuzz_strategies import FUZZ

floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
words = st.text(max_size=40) | st.sampled_from(("", "user", "system", "assistant", "a" * 300))


@pytest.fixture(scope="module")
def stack(tiny_model_dir, cache_dir):
    """An engine that is never started: submissions are validated and queued, nothing runs."""
    loaded = load_model(str(tiny_model_dir), cache_dir, "cpu", "float32")
    return build_stack(loaded, ServerConfig(kv_cache_tokens=1024, max_model_len=256, max_waiting=10**9,
                                            adapters_poll_interval=0))


@st.composite
def generate_requests(draw: st.DrawFn) -> pb.GenerateRequest:
    sampling = pb.SamplingParameters(temperature=draw(floats), top_p=draw(floats),
                                     top_k=draw(st.integers(0, 2**32 - 1)), repetition_penalty=draw(floats))
    if draw(st.booleans()):
        sampling.seed = draw(st.integers(0, 2**64 - 1))
    stopping = pb.StoppingCriteria(max_new_tokens=draw(st.integers(0, 2**32 - 1)),
                                   stop_sequences=draw(st.lists(words, max_size=3)), ignore_eos=draw(st.booleans()))
    request = pb.GenerateRequest(adapter_id=draw(words), sampling=sampling, stopping=stopping,
                                 return_logprobs=draw(st.booleans()), request_id=draw(words))
    if draw(st.booleans()):
        request.text = draw(st.text(max_size=200))
    elif draw(st.booleans()):
        messages = draw(st.lists(st.tuples(words, st.text(max_size=80)), max_size=3))
        request.chat.CopyFrom(pb.ChatPrompt(messages=[pb.ChatMessage(role=r, content=c) for r, c in messages]))
    return request


@FUZZ
@given(request=generate_requests())
def test_random_requests_are_accepted_or_refused_with_a_short_domain_error(stack, request) -> None:
    try:
        stack.engine.submit(request_from_proto(request), lambda out: None)
    except (InvalidRequest, UnknownAdapter, Overloaded) as error:
        assert 0 < len(str(error)) < 600, str(error)[:200]


@FUZZ
@given(data=st.data())
def test_streamed_text_is_never_broken_utf8_and_adds_up(stack, data) -> None:
    tokenizer = stack.loaded.tokenizer
    vocab = len(tokenizer)
    ids = st.integers(0, vocab - 1)
    prompt = data.draw(st.lists(ids, min_size=0, max_size=8))
    output = data.draw(st.lists(ids, min_size=1, max_size=24))
    detok = IncrementalDetokenizer(stack.engine.encoder, prompt)
    deltas = [detok.add(token) for token in output]
    deltas.append(detok.flush())
    for delta in deltas[:-1]:
        delta.encode("utf-8")  # no lone surrogates
        assert not delta.endswith("\ufffd") or "\ufffd" in _decode(tokenizer, prompt[-CONTEXT_TOKENS:] + output)
    context = prompt[-CONTEXT_TOKENS:]
    whole = _decode(tokenizer, context + output)
    assert "".join(deltas) == whole[len(_decode(tokenizer, context)):]


def _decode(tokenizer, ids: list[int]) -> str:  # noqa: ANN001
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
