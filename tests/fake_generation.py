"""A fake Generation server on a real loopback socket, for the client and deltactl tests."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from clients import DeltaClient
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
