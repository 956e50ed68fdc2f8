"""The sync and asyncio clients and deltactl, over a real loopback socket against a fake Generation service."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from clients import AsyncDeltaClient, DeltaClient, GenerationResult, TokenChunk
from clients.cli import main
from clients.messages import finish_reason_name
from deltaserve.v1 import generation_pb2 as pb
from deltaserve.v1 import generation_pb2_grpc as pb_grpc

ABORT_PROMPT = "boom"          # aborted with INVALID_ARGUMENT before any token (mid-stream when streaming)
HANG_PROMPT = "hang"           # streams one token, then waits for the client to go away
ABORT_DETAILS = "boom is not a prompt"
SERVER_SEED = 1234
LOGPROB = -0.5                 # exact in float32


def prompt_of(request: pb.GenerateRequest) -> str:
    if request.WhichOneof("prompt") == "chat":
        return request.chat.messages[-1].content
    return request.text


def reply_pieces(request: pb.GenerateRequest) -> list[str]:
    """The fake "tokens" of the reply: "echo:" then each word of the prompt, with its leading space."""
    return ["echo:"] + [f" {word}" for word in prompt_of(request).split()]


def final_response(request: pb.GenerateRequest) -> pb.GenerateResponse:
    pieces = reply_pieces(request)
    stopping = request.stopping
    if stopping.stop_sequences:
        reason = pb.FINISH_REASON_STOP_SEQUENCE
    else:
        reason = pb.FINISH_REASON_LENGTH if stopping.ignore_eos else pb.FINISH_REASON_EOS
    return pb.GenerateResponse(
        request_id=request.request_id or "server-made-id",
        text="".join(pieces),
        token_ids=list(range(len(pieces))),
        finish_reason=reason,
        prompt_tokens=len(prompt_of(request).split()),
        generated_tokens=len(pieces),
        seed=request.sampling.seed if request.sampling.HasField("seed") else SERVER_SEED,
        logprobs=[LOGPROB] * len(pieces) if request.return_logprobs else [],
        stop_sequence=stopping.stop_sequences[0] if stopping.stop_sequences else "",
        adapter_id=request.adapter_id,
    )


class FakeGeneration(pb_grpc.GenerationServicer):
    """Records every request (with its metadata and deadline) and answers with an echo of its prompt."""

    def __init__(self) -> None:
        self.requests: list[pb.GenerateRequest] = []
        self.metadata: list[dict[str, str]] = []
        self.time_remaining: list[float | None] = []
        self.cancelled = threading.Event()

    def reset(self) -> None:
        self.requests.clear()
        self.metadata.clear()
        self.time_remaining.clear()
        self.cancelled.clear()

    def _record(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> None:
        self.requests.append(request)
        self.metadata.append({key: value for key, value in context.invocation_metadata()})
        self.time_remaining.append(context.time_remaining())

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
        self._record(request, context)
        if prompt_of(request) == ABORT_PROMPT:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, ABORT_DETAILS)
        return final_response(request)

    def GenerateStream(self, request: pb.GenerateRequest,
                       context: grpc.ServicerContext) -> Iterator[pb.GenerateStreamResponse]:
        self._record(request, context)
        completed = threading.Event()
        # gRPC stops pulling a cancelled stream's generator, so the handler may never resume after a
        # yield: the termination callback is the one place that always learns of the cancellation.
        context.add_callback(lambda: None if completed.is_set() else self.cancelled.set())
        for index, piece in enumerate(reply_pieces(request)):
            logprobs = [LOGPROB] if request.return_logprobs else []
            yield pb.GenerateStreamResponse(token=pb.TokenEvent(token_ids=[index], text=piece, logprobs=logprobs))
            if prompt_of(request) == ABORT_PROMPT:
                completed.set()
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, ABORT_DETAILS)
            if prompt_of(request) == HANG_PROMPT:
                threading.Event().wait(timeout=60)
                return
        completed.set()
        yield pb.GenerateStreamResponse(final=final_response(request))

    def ModelInfo(self, request: pb.ModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfoResponse:
        return pb.ModelInfoResponse(
            model_id="fake/tiny", architecture="LlamaForCausalLM", dtype="float32", device="cpu",
            max_context_length=2048, vocab_size=49152, max_batch_size=8, max_waiting_requests=64,
            kv_cache=pb.KvCacheInfo(block_size=16, total_blocks=100, free_blocks=75, usage=0.25),
            running_requests=1, waiting_requests=0,
            adapters=[pb.AdapterSummary(id="pirate", format="peft_lora", methods=["lora"])],
        )


@dataclass
class FakeServer:
    target: str
    servicer: FakeGeneration


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeServer]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    servicer = FakeGeneration()
    pb_grpc.add_GenerationServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("down", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield FakeServer(f"127.0.0.1:{port}", servicer)
    server.stop(grace=None)


@pytest.fixture
def fake(fake_server: FakeServer) -> FakeServer:
    fake_server.servicer.reset()
    return fake_server


@pytest.fixture
def client(fake: FakeServer) -> Iterator[DeltaClient]:
    with DeltaClient(fake.target) as opened:
        yield opened


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


# --- deltactl -------------------------------------------------------------------------------------------

def test_cli_generate_sends_a_user_message_and_prints_the_text(fake: FakeServer, capsys) -> None:
    assert main(["generate", "--target", fake.target, "hello there"]) == 0
    assert capsys.readouterr().out == "echo: hello there\n"
    request = fake.servicer.requests[-1]
    assert [(m.role, m.content) for m in request.chat.messages] == [("user", "hello there")]


def test_cli_generate_system_and_raw(fake: FakeServer, capsys) -> None:
    assert main(["generate", "--target", fake.target, "--system", "be terse", "q"]) == 0
    assert [m.role for m in fake.servicer.requests[-1].chat.messages] == ["system", "user"]
    assert fake.servicer.requests[-1].chat.messages[0].content == "be terse"
    assert main(["generate", "--target", fake.target, "--raw", "plain text"]) == 0
    assert fake.servicer.requests[-1].WhichOneof("prompt") == "text"
    assert fake.servicer.requests[-1].text == "plain text"
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--target", fake.target, "--raw", "--system", "s", "q"])
    assert exited.value.code == 2


def test_cli_generate_options_and_json(fake: FakeServer, capsys) -> None:
    argv = ["generate", "--target", fake.target, "--adapter", "pirate", "--json", "--max-new-tokens", "9",
            "--temperature", "0.5", "--top-p", "0.75", "--top-k", "3", "--repetition-penalty", "1.5",
            "--seed", "11", "--stop", "A", "--stop", "B", "--ignore-eos", "--logprobs", "yo ho"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 1
    response = json.loads(out)
    assert response["text"] == "echo: yo ho" and response["finish_reason"] == "stop_sequence"
    assert response["seed"] == 11 and response["adapter_id"] == "pirate" and response["stop_sequence"] == "A"
    assert response["logprobs"] == [LOGPROB] * 3
    request = fake.servicer.requests[-1]
    assert request.stopping.max_new_tokens == 9 and list(request.stopping.stop_sequences) == ["A", "B"]
    assert request.stopping.ignore_eos and request.return_logprobs
    assert (request.sampling.temperature, request.sampling.top_p, request.sampling.top_k,
            request.sampling.repetition_penalty) == (0.5, 0.75, 3, 1.5)


def test_cli_generate_stream(fake: FakeServer, capsys) -> None:
    assert main(["generate", "--target", fake.target, "--stream", "a b c"]) == 0
    assert capsys.readouterr().out == "echo: a b c\n"
    assert main(["generate", "--target", fake.target, "--stream", "--json", "a b c"]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 1
    assert json.loads(out)["text"] == "echo: a b c"
    assert json.loads(out)["generated_tokens"] == 4


def test_cli_generate_reads_stdin(fake: FakeServer, capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("from stdin"))
    assert main(["generate", "--target", fake.target, "-"]) == 0
    assert capsys.readouterr().out == "echo: from stdin\n"
    assert fake.servicer.requests[-1].chat.messages[0].content == "from stdin"


def test_cli_target_comes_from_the_environment(fake: FakeServer, capsys, monkeypatch) -> None:
    monkeypatch.setenv("DELTASERVE_TARGET", fake.target)
    assert main(["health"]) == 0
    assert capsys.readouterr().out == "SERVING\n"


@pytest.mark.parametrize("stream", [False, True])
def test_cli_reports_rpc_errors(fake: FakeServer, capsys, stream: bool) -> None:
    argv = ["generate", "--target", fake.target, ABORT_PROMPT] + (["--stream"] if stream else [])
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "INVALID_ARGUMENT" in err and ABORT_DETAILS in err


def test_cli_reports_an_unreachable_server(capsys) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    assert main(["health", "--target", f"127.0.0.1:{free_port}", "--timeout", "5"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_cli_reports_invalid_values(fake: FakeServer, capsys) -> None:
    assert main(["generate", "--target", fake.target, "--max-new-tokens", "-1", "x"]) == 2
    assert capsys.readouterr().err.startswith("deltactl: ")
    assert fake.servicer.requests == []


def test_cli_health_exit_codes(fake: FakeServer, capsys) -> None:
    assert main(["health", "--target", fake.target, "--service", "down"]) == 1
    assert capsys.readouterr().out == "NOT_SERVING\n"
    assert main(["health", "--target", fake.target, "--service", "nope"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_cli_info(fake: FakeServer, capsys) -> None:
    assert main(["info", "--target", fake.target]) == 0
    out = capsys.readouterr().out
    assert "fake/tiny" in out and "LlamaForCausalLM" in out and "75/100 blocks free" in out
    assert "pirate" in out and "peft_lora" in out and "25.0% used" in out
    assert main(["info", "--target", fake.target, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["vocab_size"] == 49152 and info["running_requests"] == 1
