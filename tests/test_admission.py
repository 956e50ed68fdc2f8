"""Admission and cancellation on a tiny model over real gRPC: a burst beyond --max-waiting is refused at once,
every accepted request finishes with the right tokens, and requests sharing a request_id cancel independently."""

from __future__ import annotations

import threading
from collections.abc import Callable

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from deltaserve.v1 import generation_pb2 as pb
from server.engine.request import FinishReason, GenerationRequest, RequestOutput
from tests.helpers import ServerThread

PROMPTS = ["Hello there", "The quick brown fox", "1 2 3 4 5", "Why is the sky blue?", "Paris is", "def main():",
           "Once upon a time", "a b c"]
NEW_TOKENS = 12
LONG = 400   # tokens: long enough to be running when cancelled
BURST = 96
CALL_TIMEOUT = 300   # a hung request fails the test instead of blocking it


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir, cache_dir):
    with ServerThread(model=str(tiny_model_dir), cache_dir=cache_dir, max_waiting=8, max_batch_size=8,
                      block_size=8, warmup=False) as running:
        yield running


@pytest.fixture(scope="module")
def expected(tiny_model_dir) -> dict[str, list[int]]:
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    out = {}
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            gen = hf.generate(**ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                              pad_token_id=0)
        out[prompt] = gen[0, ids["input_ids"].shape[1]:].tolist()
    return out


def _request(index: int, request_id: str = "") -> pb.GenerateRequest:
    return pb.GenerateRequest(text=PROMPTS[index % len(PROMPTS)], request_id=request_id,
                              stopping=pb.StoppingCriteria(max_new_tokens=NEW_TOKENS, ignore_eos=True))


class Tally:
    """Counts finished gRPC futures (grpc.Future is not a concurrent.futures.Future: no `wait` for it)."""

    def __init__(self, calls: list[grpc.Future]) -> None:
        self.done = 0
        self._cond = threading.Condition()
        for call in calls:
            call.add_done_callback(self._finished)

    def _finished(self, call: grpc.Future) -> None:
        with self._cond:
            self.done += 1
            self._cond.notify_all()

    def wait_for(self, count: int) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.done >= count, CALL_TIMEOUT)


def _outcomes(calls: list[grpc.Future], expected: dict[str, list[int]]) -> tuple[int, int]:
    """(accepted, refused) of finished calls, after checking every accepted one's tokens."""
    accepted = refused = 0
    for index, call in enumerate(calls):
        if call.exception() is None:
            assert list(call.result().token_ids) == expected[PROMPTS[index % len(PROMPTS)]]
            accepted += 1
        else:
            assert call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, call.details()
            refused += 1
    return accepted, refused


def test_burst_beyond_max_waiting_is_refused_at_once(tiny_server, expected):
    engine = tiny_server.engine
    # Hold the engine thread, so that nothing leaves the waiting queue while the burst arrives: exactly
    # max_waiting requests may be accepted, however the submissions interleave.
    hold, held = threading.Event(), threading.Event()
    blocker = threading.Thread(target=engine.call, args=(lambda: (held.set(), hold.wait(CALL_TIMEOUT)),))
    blocker.start()
    assert held.wait(CALL_TIMEOUT)
    calls = [tiny_server.stub.Generate.future(_request(i)) for i in range(BURST)]
    tally = Tally(calls)
    # Nothing can finish while the engine is held: the calls that end now are the refused ones.
    assert tally.wait_for(BURST - 8), f"only {tally.done} of {BURST - 8} excess requests were refused at once"
    assert all(call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for call in calls if call.done())
    hold.set()
    blocker.join()
    assert tally.wait_for(BURST), f"{BURST - tally.done} requests hung"
    assert _outcomes(calls, expected) == (8, BURST - 8)


def test_burst_with_engine_running_finishes_or_is_refused(tiny_server, expected):
    calls = [tiny_server.stub.Generate.future(_request(i)) for i in range(BURST)]
    tally = Tally(calls)
    assert tally.wait_for(BURST), f"{BURST - tally.done} requests hung"
    accepted, refused = _outcomes(calls, expected)
    assert accepted + refused == BURST and accepted >= 8
    info = tiny_server.info()
    assert info.max_waiting_requests == 8 and info.max_batch_size == 8


def test_same_request_id_cancels_independently_over_grpc(tiny_server, expected):
    def stream(prompt: str) -> grpc.Future:
        return tiny_server.stub.GenerateStream(pb.GenerateRequest(
            text=prompt, request_id="twin", stopping=pb.StoppingCriteria(max_new_tokens=LONG, ignore_eos=True)))

    first = stream(PROMPTS[0])
    next(first)
    second = stream(PROMPTS[1])
    next(second)
    second.cancel()   # the younger twin: cancelling by request_id would have found the older one first
    events = list(first)
    final = events[-1].final
    assert final.finish_reason == pb.FINISH_REASON_LENGTH and len(final.token_ids) == LONG
    assert list(final.token_ids[:NEW_TOKENS]) == expected[PROMPTS[0]]


def test_same_request_id_cancels_independently_in_the_engine(tiny_server):
    engine = tiny_server.engine
    started = [threading.Event(), threading.Event()]
    outputs: list[list[RequestOutput]] = [[], []]

    def sink_for(index: int) -> Callable[[RequestOutput], None]:
        def sink(out: RequestOutput) -> None:
            outputs[index].append(out)
            started[index].set()
        return sink

    handles = [engine.submit(GenerationRequest("twin", prompt=PROMPTS[i], max_new_tokens=LONG, ignore_eos=True),
                             sink_for(i)) for i in range(2)]
    assert all(event.wait(CALL_TIMEOUT) for event in started)
    handles[1].cancel()
    handles[1].cancel()   # twice: still only this one
    engine.call(lambda: None)   # the cancel is done once a later command ran
    assert outputs[1][-1].finish_reason is FinishReason.CANCELLED
    assert not outputs[0][-1].finished
    handles[0].cancel()
    engine.call(lambda: None)
    assert outputs[0][-1].finish_reason is FinishReason.CANCELLED
