"""The default model over real gRPC sockets: parity with Hugging Face, streaming, cancel, errors."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from deltaserve.v1 import generation_pb2 as pb
from tests.helpers import chat_request

pytestmark = pytest.mark.integration

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
           "Explain gravity to a child.", "What is 12 times 7?", "Name a famous painter.",
           "Give me a tip for learning Python.", "What colour is the sky on Mars?",
           "Translate 'good morning' to Spanish.", "Why do cats purr?", "Describe a rainbow.",
           "What is photosynthesis?", "Suggest a name for a dog.", "How many legs does a spider have?",
           "Tell me a fun fact about octopuses.", "What is the boiling point of water?"]
NEW_TOKENS = 64


def _hf_greedy(hf, tokenizer, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    with torch.inference_mode():
        out = hf.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, ids["input_ids"].shape[1]:].tolist()


@pytest.fixture(scope="module")
def expected(hf_default_model, default_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    return {p: _hf_greedy(hf_default_model, tokenizer, p) for p in PROMPTS}


def _generate(server, prompt: str) -> pb.GenerateResponse:
    return server.stub.Generate(chat_request(prompt, stopping=pb.StoppingCriteria(max_new_tokens=NEW_TOKENS)))


def test_health_serving_and_reflection(server):
    health = health_pb2_grpc.HealthStub(server.channel)
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    response = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in response.list_services_response.service}
    assert {"deltaserve.v1.Generation", "grpc.health.v1.Health"} <= names


def test_capital_of_france(server):
    response = _generate(server, "What is the capital of France?")
    assert "Paris" in response.text
    assert response.finish_reason == pb.FINISH_REASON_EOS
    assert response.generated_tokens == len(response.token_ids)


def test_greedy_parity_alone(server, expected):
    for prompt in PROMPTS[:4]:
        assert list(_generate(server, prompt).token_ids) == expected[prompt], prompt


def test_greedy_parity_sixteen_concurrent(server, expected):
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        responses = list(pool.map(lambda p: _generate(server, p), PROMPTS))
    for prompt, response in zip(PROMPTS, responses, strict=True):
        assert list(response.token_ids) == expected[prompt], prompt


def test_stream_events_add_up_to_final(server):
    events = list(server.stub.GenerateStream(chat_request("Write a haiku about the sea.", return_logprobs=True,
                                                          stopping=pb.StoppingCriteria(max_new_tokens=24))))
    tokens = [e.token for e in events if e.HasField("token")]
    final = events[-1].final
    assert events[-1].HasField("final") and len(tokens) >= 2
    assert "".join(t.text for t in tokens) == final.text
    assert [i for t in tokens for i in t.token_ids] == list(final.token_ids)
    assert len(final.logprobs) == len(final.token_ids) and all(lp <= 0 for lp in final.logprobs)


def test_same_seed_same_text(server):
    def sampled(seed: int) -> str:
        sampling = pb.SamplingParameters(temperature=0.9, top_p=0.95, seed=seed)
        return server.stub.Generate(chat_request("Tell me a story.", sampling=sampling,
                                                 stopping=pb.StoppingCriteria(max_new_tokens=24))).text
    assert sampled(7) == sampled(7)
    response = server.stub.Generate(chat_request("Hi", sampling=pb.SamplingParameters(temperature=0.7)))
    assert response.seed != 0


def test_cancelled_stream_frees_kv_and_spares_others(server, expected):
    prompt = PROMPTS[1]
    others: list[pb.GenerateResponse] = []
    thread = threading.Thread(target=lambda: others.append(_generate(server, prompt)))
    stream = server.stub.GenerateStream(chat_request("Count to one thousand.", stopping=pb.StoppingCriteria(
        max_new_tokens=2000, ignore_eos=True)))
    next(stream)
    thread.start()
    assert server.info().kv_cache.free_blocks < server.info().kv_cache.total_blocks
    stream.cancel()
    thread.join()
    deadline = time.monotonic() + 10
    while server.info().running_requests and time.monotonic() < deadline:
        time.sleep(0.05)
    info = server.info()
    assert info.kv_cache.free_blocks == info.kv_cache.total_blocks and info.running_requests == 0
    assert list(others[0].token_ids) == expected[prompt]


@pytest.mark.parametrize(("request_", "needle"), [
    (pb.GenerateRequest(text=""), "prompt is empty"),
    (pb.GenerateRequest(), "no prompt"),
    (pb.GenerateRequest(text="hi " * 5000), "the context holds"),
    (pb.GenerateRequest(text="hi", sampling=pb.SamplingParameters(temperature=-0.5)), "temperature"),
    (pb.GenerateRequest(text="hi", sampling=pb.SamplingParameters(top_p=7)), "top_p"),
    (pb.GenerateRequest(text="hi", stopping=pb.StoppingCriteria(max_new_tokens=10**9)), "context length"),
    (pb.GenerateRequest(text="hi", sampling=pb.SamplingParameters(repetition_penalty=-1)), "repetition_penalty"),
])
def test_bad_requests_get_invalid_argument(server, request_, needle):
    for call in (server.stub.Generate, lambda r: list(server.stub.GenerateStream(r))):
        with pytest.raises(grpc.RpcError) as caught:
            call(request_)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert needle in caught.value.details()
    assert "Paris" in _generate(server, "What is the capital of France?").text


def test_unknown_adapter_is_not_found(server):
    with pytest.raises(grpc.RpcError) as caught:
        server.stub.Generate(pb.GenerateRequest(text="hi", adapter_id="no-such-adapter"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-adapter" in caught.value.details()
