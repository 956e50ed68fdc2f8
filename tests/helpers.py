"""Test helpers: an in-process server on its own event loop thread, and engine shortcuts."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import grpc
import torch

from deltaserve.v1 import generation_pb2 as pb
from deltaserve.v1 import generation_pb2_grpc as pb_grpc
from server.config import ServerConfig
from server.engine.engine import Engine
from server.engine.request import GenerationRequest, GenerationResult, RequestOutput
from server.kernels.interface import DecodeVisibility
from server.model.batch import AdapterSegments, BatchDescriptor


class ServerThread:
    """Runs `server.serve.start` on a private event loop; the gRPC port is real (loopback)."""

    def __init__(self, **config: Any) -> None:
        config.setdefault("host", "127.0.0.1")
        config.setdefault("port", 0)
        config.setdefault("kv_cache_tokens", 16384)
        config.setdefault("metrics_port", 0)   # tests may run several servers: never the fixed default
        config.setdefault("http_port", 0)
        self.config = ServerConfig(**config)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.running: Any = None

    def __enter__(self) -> ServerThread:
        from server.serve import start

        self.thread.start()
        self.running = asyncio.run_coroutine_threadsafe(start(self.config), self.loop).result(timeout=300)
        self.target = f"127.0.0.1:{self.running.port}"
        self.channel = grpc.insecure_channel(self.target)
        self.stub = pb_grpc.GenerationStub(self.channel)
        return self

    @property
    def engine(self) -> Engine:
        return self.running.engine

    @property
    def http_url(self) -> str:
        """The OpenAI-compatible API's base URL (append /v1 for the openai client)."""
        return self.running.http.url

    @property
    def metrics_url(self) -> str:
        return self.running.metrics.server.url

    def __exit__(self, *exc: object) -> None:
        self.channel.close()
        asyncio.run_coroutine_threadsafe(self.running.stop(5.0), self.loop).result(timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)

    def info(self) -> pb.ModelInfoResponse:
        return self.stub.ModelInfo(pb.ModelInfoRequest())


def chat_request(text: str, **kwargs: Any) -> pb.GenerateRequest:
    return pb.GenerateRequest(chat=pb.ChatPrompt(messages=[pb.ChatMessage(role="user", content=text)]), **kwargs)


def run_engine(engine: Engine, request: GenerationRequest, timeout: float = 120) -> tuple[
        GenerationResult, list[RequestOutput]]:
    """Submits to a started engine and waits for the result; returns it with every output."""
    done = threading.Event()
    outputs: list[RequestOutput] = []

    def sink(out: RequestOutput) -> None:
        outputs.append(out)
        if out.finished:
            done.set()

    engine.submit(request, sink)
    assert done.wait(timeout), f"{request.request_id} did not finish in {timeout}s"
    assert outputs[-1].result is not None
    return outputs[-1].result, outputs


def segment_batch(token_slots: list[int]) -> BatchDescriptor:
    """A batch of rows with only what the delta methods read: each row's adapter slot, as segments."""
    bounds, slots = [0], []
    for row, slot in enumerate(token_slots):
        if slots and slot != slots[-1]:
            bounds.append(row)
        if not slots or slot != slots[-1]:
            slots.append(slot)
    bounds.append(len(token_slots))
    empty = torch.zeros(0, dtype=torch.long)
    t = torch.tensor(token_slots)
    return BatchDescriptor(input_ids=t, positions=t, slot_mapping=t, logits_indices=empty, prefill_ranges=[],
                           decode_rows=empty, decode_block_tables=empty.view(0, 0),
                           decode_visibility=DecodeVisibility(empty, empty, empty), block_size=1,
                           segments=AdapterSegments(bounds, slots))


def chat_ids(tokenizer: Any, prompt: str) -> list[int]:
    """A user prompt rendered with the model's chat template, as the server encodes it."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def load_peft_adapters(model_dir: Any, adapters_dir: Any, names: list[str]) -> Any:
    """The model in fp32 as a PeftModel holding every named adapter (read from adapters_dir / name)."""
    from pathlib import Path

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, Path(adapters_dir) / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(Path(adapters_dir) / name, adapter_name=name)
    return model.eval()


def peft_last_logits(peft_model: Any, adapter: str | None, ids: list[int]) -> torch.Tensor:
    """PEFT's own forward of one sequence with one adapter (None: the base model): the last position's logits."""
    with torch.inference_mode():
        if adapter is None:
            with peft_model.disable_adapter():
                return peft_model(input_ids=torch.tensor([ids])).logits[0, -1]
        peft_model.set_adapter(adapter)
        return peft_model(input_ids=torch.tensor([ids])).logits[0, -1]
