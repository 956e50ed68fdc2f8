"""The sync and asyncio clients, over a real loopback socket against a fake Generation service."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from clients import AsyncDeltaClient, DeltaClient, GenerationResult, TokenChunk
from clients.messages import finish_reason_name
from tests.fake_generation import (
    ABORT_DETAILS,
    ABORT_PROMPT,
    HANG_PROMPT,
    LOGPROB,
    SERVER_SEED,
    FakeServer,
)

# --- request building and result conversion, through the sync client -----------------------------

def test_raw_prompt_is_sent_as_text_with_defaults(client: DeltaClient, fake: FakeServer) -> None:
    result = client.generate("hello world")
    request = fake.servicer.requests[-1]
    assert request.WhichOneof("prompt") == "text"
    assert request.text == "hello world"
    assert request.adapter_id == "" and request.request_id == "" and not request.return_logprobs
    assert not request.sampling.HasField("seed")
    assert request.sampling.temperature == 0 and request.sampling.top_k == 0
    assert request.stopping.max_new_tokens == 0 and list(request.stopping.stop_sequences) == []
    assert result == GenerationResult(
        request_id="server-made-id", text="echo: hello world", token_ids=[0, 1, 2], finish_reason="eos",
        prompt_tokens=2, generated_tokens=3, seed=SERVER_SEED, logprobs=[], stop_sequence="", adapter_id="",
    )


def test_chat_and_every_option_reach_the_server(client: DeltaClient, fake: FakeServer) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    result = client.generate(
        messages=messages, adapter="pirate", max_new_tokens=7, temperature=0.5, top_p=0.75, top_k=40,
        repetition_penalty=1.25, seed=99, stop=["\n", "END"], ignore_eos=True, logprobs=True, request_id="r-1",
    )
    request = fake.servicer.requests[-1]
    assert request.WhichOneof("prompt") == "chat"
    assert [(m.role, m.content) for m in request.chat.messages] == [("system", "be brief"), ("user", "hi there")]
    assert request.adapter_id == "pirate" and request.request_id == "r-1" and request.return_logprobs
    sampling, stopping = request.sampling, request.stopping
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.repetition_penalty) == (
        0.5, 0.75, 40, 1.25)
    assert sampling.HasField("seed") and sampling.seed == 99
    assert (stopping.max_new_tokens, list(stopping.stop_sequences), stopping.ignore_eos) == (7, ["\n", "END"], True)
    assert result.finish_reason == "stop_sequence" and result.stop_sequence == "\n"
    assert result.seed == 99 and result.adapter_id == "pirate" and result.request_id == "r-1"
    assert result.logprobs == [LOGPROB] * 3
    assert json.loads(json.dumps(result.to_dict()))["token_ids"] == [0, 1, 2]


@pytest.mark.parametrize("kwargs", [
    {},
    {"prompt": "x", "messages": [{"role": "user", "content": "x"}]},
    {"messages": []},
    {"messages": [{"role": "user"}]},
])
def test_prompt_arguments_are_validated_before_any_rpc(client: DeltaClient, fake: FakeServer,
                                                       kwargs: dict) -> None:
    with pytest.raises(ValueError):
        client.generate(**kwargs)
    with pytest.raises(ValueError):
        client.generate_stream(**kwargs)
    assert fake.servicer.requests == []


def test_finish_reason_names() -> None:
    assert [finish_reason_name(value) for value in range(5)] == [
        "unspecified", "length", "eos", "stop_sequence", "cancelled"]
    assert finish_reason_name(42) == "unknown_42"


def test_timeout_and_metadata_go_with_every_call(fake: FakeServer) -> None:
    with DeltaClient(fake.target, timeout=30, metadata=(("x-tenant", "acme"),)) as client:
        client.generate("a")
        list(client.generate_stream("b"))
    for metadata, remaining in zip(fake.servicer.metadata, fake.servicer.time_remaining, strict=True):
        assert metadata["x-tenant"] == "acme"
        # gRPC rounds deadlines up a little.
        assert remaining is not None and 0 < remaining <= 31


def test_rpc_errors_propagate(client: DeltaClient) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        client.generate(ABORT_PROMPT)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == ABORT_DETAILS


# --- streaming ----------------------------------------------------------------------------------------

def test_stream_yields_chunks_then_the_result(client: DeltaClient) -> None:
    events = list(client.generate_stream(messages=[{"role": "user", "content": "one two"}], logprobs=True))
    *chunks, final = events
    assert chunks == [TokenChunk([0], "echo:", [LOGPROB]), TokenChunk([1], " one", [LOGPROB]),
                      TokenChunk([2], " two", [LOGPROB])]
    assert isinstance(final, GenerationResult)
    assert final.text == "".join(chunk.text for chunk in chunks)
    assert final.token_ids == [0, 1, 2] and final.finish_reason == "eos"


def test_stream_error_after_a_chunk_propagates(client: DeltaClient) -> None:
    stream = client.generate_stream(ABORT_PROMPT)
    assert isinstance(next(stream), TokenChunk)
    with pytest.raises(grpc.RpcError) as caught:
        next(stream)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_breaking_out_of_the_stream_cancels_the_rpc(client: DeltaClient, fake: FakeServer) -> None:
    for event in client.generate_stream(HANG_PROMPT):
        assert isinstance(event, TokenChunk)
        break
    # Still inside the client: closing the channel would cancel the call by itself.
    assert fake.servicer.cancelled.wait(timeout=30)


def test_closing_a_held_stream_cancels_the_rpc(client: DeltaClient, fake: FakeServer) -> None:
    stream = client.generate_stream(HANG_PROMPT)
    next(stream)
    assert not fake.servicer.cancelled.wait(timeout=0.2)
    stream.close()
    assert fake.servicer.cancelled.wait(timeout=30)
    with pytest.raises(grpc.RpcError) as caught:
        next(stream)
    assert caught.value.code() == grpc.StatusCode.CANCELLED


def test_leaving_a_stream_block_cancels_the_rpc(client: DeltaClient, fake: FakeServer) -> None:
    with client.generate_stream(HANG_PROMPT) as stream:
        next(stream)
    assert fake.servicer.cancelled.wait(timeout=30)


def test_closing_a_finished_stream_is_harmless(client: DeltaClient) -> None:
    with client.generate_stream("done") as stream:
        events = list(stream)
    assert isinstance(events[-1], GenerationResult)
    assert stream.cancel() is False


# --- model info and health ----------------------------------------------------------------------------

def test_model_info_is_a_dict_with_every_field(client: DeltaClient) -> None:
    info = client.model_info()
    assert info["model_id"] == "fake/tiny" and info["max_context_length"] == 2048
    assert info["waiting_requests"] == 0  # zero values are kept
    assert info["kv_cache"] == {"block_size": 16, "total_blocks": 100, "free_blocks": 75, "usage": 0.25}
    assert info["adapters"] == [{"id": "pirate", "format": "peft_lora", "methods": ["lora"]}]


def test_health(client: DeltaClient) -> None:
    assert client.health() == "SERVING"
    assert client.health("down") == "NOT_SERVING"
    with pytest.raises(grpc.RpcError) as caught:
        client.health("no-such-service")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


# --- asyncio client ------------------------------------------------------------------------------------

def test_async_client_generate_info_and_health(fake: FakeServer) -> None:
    async def scenario() -> tuple[GenerationResult, dict, str]:
        async with AsyncDeltaClient(fake.target, timeout=30, metadata=(("x-tenant", "acme"),)) as client:
            result = await client.generate(messages=[{"role": "user", "content": "hi"}], adapter="pirate",
                                           seed=5, stop=["x"])
            return result, await client.model_info(), await client.health()

    result, info, status = asyncio.run(scenario())
    request = fake.servicer.requests[-1]
    assert request.WhichOneof("prompt") == "chat" and request.adapter_id == "pirate"
    assert request.sampling.seed == 5 and list(request.stopping.stop_sequences) == ["x"]
    assert fake.servicer.metadata[-1]["x-tenant"] == "acme"
    assert result.text == "echo: hi" and result.finish_reason == "stop_sequence" and result.seed == 5
    assert info["adapters"][0]["id"] == "pirate"
    assert status == "SERVING"


def test_async_client_stream_and_errors(fake: FakeServer) -> None:
    async def scenario() -> list:
        async with AsyncDeltaClient(fake.target) as client:
            events = [event async for event in client.generate_stream("a b", logprobs=True)]
            with pytest.raises(ValueError):
                await client.generate()
            with pytest.raises(grpc.RpcError) as caught:
                await client.generate(ABORT_PROMPT)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.RpcError):
                async for _ in client.generate_stream(ABORT_PROMPT):
                    pass
            return events

    *chunks, final = asyncio.run(scenario())
    assert [chunk.text for chunk in chunks] == ["echo:", " a", " b"]
    assert all(isinstance(chunk, TokenChunk) and chunk.logprobs == [LOGPROB] for chunk in chunks)
    assert isinstance(final, GenerationResult) and final.text == "echo: a b"


def test_async_stream_cancels_on_break_and_on_exit(fake: FakeServer) -> None:
    servicer = fake.servicer

    async def scenario() -> None:
        async with AsyncDeltaClient(fake.target) as client:
            async for event in client.generate_stream(HANG_PROMPT):
                assert isinstance(event, TokenChunk)
                break
            assert await asyncio.to_thread(servicer.cancelled.wait, 30)
            servicer.cancelled.clear()
            async with client.generate_stream(HANG_PROMPT) as stream:
                await anext(stream)
                assert not await asyncio.to_thread(servicer.cancelled.wait, 0.2)
            assert await asyncio.to_thread(servicer.cancelled.wait, 30)

    asyncio.run(scenario())
