"""Helpers for the hot-load tests: LoRA adapters for the tiny model on disk, and their offline answers."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.lora_fixtures import ALL_LINEARS, write_peft_lora
from server.app import build_stack
from server.config import ServerConfig
from server.engine.engine import Engine
from server.engine.request import GenerationRequest, GenerationResult, RequestOutput
from server.model.loader import LoadedModel
from tests.helpers import run_engine

PROMPTS = ["Hello there", "The quick brown fox", "1 2 3 4", "Why is the sky blue?"]
NEW_TOKENS = 12


def write_adapter(path: Path, shape: Any, seed: int, rank: int = 4) -> Path:
    """A PEFT LoRA on every linear, strong enough (alpha = 64 r) to change the tiny model's greedy tokens."""
    return write_peft_lora(path, shape, rank, ALL_LINEARS, seed=seed, alpha=64.0 * rank)


def request(request_id: str, prompt: str, adapter: str, new_tokens: int = NEW_TOKENS) -> GenerationRequest:
    return GenerationRequest(request_id, prompt=prompt, adapter_id=adapter, max_new_tokens=new_tokens,
                             ignore_eos=True)


def detach_deltas(loaded: LoadedModel) -> None:
    """Takes every delta hook off the model. A stack's delta methods hook themselves into the model's modules
    for good, so two stacks built on one LoadedModel would both apply their deltas: a model serves one stack at a
    time, and an offline reference needs a model instance of its own."""
    for module in loaded.model.modules():
        if isinstance(getattr(module, "hooks", None), list):
            module.hooks.clear()
        for hooks in getattr(module, "block_hooks", {}).values():
            hooks.clear()


def offline_tokens(loaded: LoadedModel, adapter_dir: Path | None, prompts: list[str],
                   new_tokens: int = NEW_TOKENS) -> list[list[int]]:
    """Greedy tokens of a fresh engine serving only this adapter (None: the base model), one prompt at a time.

    `loaded` must be a model instance no running stack uses (see `detach_deltas`)."""
    with tempfile.TemporaryDirectory() as root:
        if adapter_dir is not None:
            shutil.copytree(adapter_dir, Path(root) / "only")
        config = ServerConfig(adapters_dir=root, kv_cache_tokens=2048, block_size=8, max_device_adapters=1,
                              adapters_poll_interval=0)
        stack = build_stack(loaded, config)
        stack.engine.start()
        try:
            return [run_engine(stack.engine, request(f"offline-{i}", p, "only" if adapter_dir else "",
                                                     new_tokens))[0].token_ids for i, p in enumerate(prompts)]
        finally:
            stack.engine.shutdown(0)
            stack.adapters.stop()
            detach_deltas(loaded)


def submit_all(engine: Engine, requests: list[GenerationRequest],
               timeout: float = 300) -> dict[str, GenerationResult | Exception]:
    """Submits every request at once and waits for all; a request refused or failed maps to its error."""
    results: dict[str, GenerationResult | Exception] = {}
    lock = threading.Lock()
    left = threading.Semaphore(0)

    def sink_for(request_id: str) -> Callable[[RequestOutput], None]:
        def sink(out: RequestOutput) -> None:
            if out.finished:
                with lock:
                    results[request_id] = out.error or out.result
                left.release()
        return sink

    for req in requests:
        try:
            engine.submit(req, sink_for(req.request_id))
        except Exception as error:  # noqa: BLE001 - recorded for the test to judge
            results[req.request_id] = error
            left.release()
    deadline = time.monotonic() + timeout
    for _ in requests:
        assert left.acquire(timeout=max(0.0, deadline - time.monotonic())), "requests did not finish in time"
    return results


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> float:
    """Seconds until `predicate()` held; raises AssertionError after `timeout`."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)
    return time.monotonic() - start
