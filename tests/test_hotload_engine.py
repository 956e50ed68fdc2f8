"""Hot-load semantics on the engine (tiny model, no gRPC): versions, unloading in use, waiting for a slot,
the disk tier, pinning, and the admin manager's checks."""

from __future__ import annotations

import os
import shutil
import threading

import pytest

from adapters_store.errors import AdapterError, AdapterNotFound
from adapters_store.versions import AdapterState, Tier
from server.adapters.errors import InvalidAdminRequest, PathNotAllowed, PinLimit
from server.app import build_stack
from server.config import ServerConfig
from server.engine.errors import UnknownAdapter
from server.engine.request import RequestOutput
from server.model.loader import load_model
from tests.helpers import run_engine
from tests.hotload_helpers import PROMPTS, detach_deltas, offline_tokens, request, submit_all, write_adapter


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, cache_dir):
    return load_model(str(tiny_model_dir), cache_dir, "cpu", "float32")


@pytest.fixture(scope="module")
def offline(tiny_model_dir, cache_dir):
    """A second instance of the tiny model, for offline references (a model serves one stack at a time)."""
    return load_model(str(tiny_model_dir), cache_dir, "cpu", "float32")


@pytest.fixture
def make_stack(tiny, tmp_path):
    stacks = []

    def make(names: dict[str, int], **overrides):
        root = tmp_path / "adapters"
        root.mkdir(exist_ok=True)
        for name, seed in names.items():
            write_adapter(root / name, tiny.shape, seed)
        config = {"adapters_dir": str(root), "kv_cache_tokens": 4096, "block_size": 8, "adapters_poll_interval": 0,
                  "adapters_load_root": str(tmp_path), **overrides}
        stack = build_stack(tiny, ServerConfig(**config))
        stack.engine.start()
        stacks.append(stack)
        return stack, root

    yield make
    for stack in stacks:
        stack.engine.shutdown(0)
        stack.adapters.stop()
    detach_deltas(tiny)


def _start_long(engine, request_id: str, adapter: str, new_tokens: int = 300):
    """Submits a long request; returns (first token seen, done, outputs)."""
    first, done, outputs = threading.Event(), threading.Event(), []

    def sink(out: RequestOutput) -> None:
        outputs.append(out)
        if out.token_ids:
            first.set()
        if out.finished:
            done.set()

    engine.submit(request(request_id, PROMPTS[0], adapter, new_tokens), sink)
    assert first.wait(60)
    return done, outputs


def test_reload_new_requests_get_new_version_running_ones_keep_old(make_stack, tiny, offline, tmp_path):
    stack, root = make_stack({"a": 1})
    done, outputs = _start_long(stack.engine, "long", "a")
    write_adapter(tmp_path / "a-v2", tiny.shape, seed=2)
    version = stack.adapters.manager.load("a", str(tmp_path / "a-v2")).version
    assert version == 2
    assert stack.slots.draining().get("a", 0) == 1
    short, _ = run_engine(stack.engine, request("short", PROMPTS[1], "a"))
    assert short.adapter_version == 2
    assert short.token_ids == offline_tokens(offline, tmp_path / "a-v2", [PROMPTS[1]])[0]
    assert done.wait(120)
    result = outputs[-1].result
    assert result.adapter_version == 1
    assert result.token_ids == offline_tokens(offline, root / "a", [PROMPTS[0]], 300)[0]
    assert stack.slots.draining().get("a", 0) == 0


def test_unload_in_use_waits_for_the_last_request(make_stack, tiny, offline):
    stack, root = make_stack({"a": 1, "b": 2})
    done, outputs = _start_long(stack.engine, "long", "a", 200)
    assert stack.adapters.manager.unload("a").state is AdapterState.UNLOADING
    with pytest.raises(UnknownAdapter, match="being unloaded"):
        stack.engine.submit(request("late", PROMPTS[0], "a"), lambda out: None)
    assert stack.adapters.manager.get("a").in_flight == 1
    assert done.wait(120)
    assert outputs[-1].result.token_ids == offline_tokens(offline, root / "a", [PROMPTS[0]], 200)[0]
    with pytest.raises(AdapterNotFound):
        stack.adapters.manager.get("a")
    run_engine(stack.engine, request("b", PROMPTS[0], "b"))  # a step clears the retired slot
    assert "a" not in stack.slots.resident()
    assert stack.adapters.manager.unload("b").state is AdapterState.UNLOADED


def test_request_for_a_busy_slot_waits_without_blocking_others(make_stack, tiny):
    stack, _ = make_stack({"a": 1, "b": 2}, max_device_adapters=1)
    done, _ = _start_long(stack.engine, "holder", "a", 150)
    order: list[str] = []
    b_done = threading.Event()

    def b_sink(out: RequestOutput) -> None:
        if out.finished:
            order.append("b")
            b_done.set()

    stack.engine.submit(request("b", PROMPTS[1], "b"), b_sink)
    for i, adapter in enumerate(["", "a", ""]):
        run_engine(stack.engine, request(f"other{i}", PROMPTS[2], adapter))
        order.append(f"other{i}")
    assert not b_done.is_set()   # "a" holds the only slot: "b" waits, the others went ahead
    assert done.wait(120) and b_done.wait(60)
    assert order[:3] == ["other0", "other1", "other2"]


def test_disk_tier_reads_back_and_changed_files_make_a_new_version(make_stack, tiny, offline):
    stack, root = make_stack({"a": 1, "b": 2, "c": 3}, max_device_adapters=1, max_host_adapters=1)
    want = {name: offline_tokens(offline, root / name, PROMPTS[:2]) for name in "abc"}
    for name in "abcab":
        for i, prompt in enumerate(PROMPTS[:2]):
            assert run_engine(stack.engine, request(f"{name}{i}", prompt, name))[0].token_ids == want[name][i]
    assert stack.store.get("c").tier is Tier.DISK
    shutil.rmtree(root / "c")
    write_adapter(root / "c", tiny.shape, seed=33)   # no watcher here: the read-back notices the change
    result, _ = run_engine(stack.engine, request("c-new", PROMPTS[0], "c"))
    assert result.adapter_version == 2
    assert result.token_ids == offline_tokens(offline, root / "c", PROMPTS[:1])[0]


def test_unreadable_files_fail_waiting_requests_with_not_found(make_stack):
    stack, root = make_stack({"a": 1, "b": 2}, max_host_adapters=0)
    assert stack.store.get("a").tier is Tier.DISK
    os.remove(root / "a" / "adapter_model.safetensors")
    results = submit_all(stack.engine, [request("gone", PROMPTS[0], "a"), request("fine", PROMPTS[0], "b")])
    assert isinstance(results["gone"], UnknownAdapter) and "missing_weights" in str(results["gone"])
    assert results["fine"].adapter_version == 1
    assert stack.adapters.manager.get("a").state is AdapterState.REJECTED


def test_pinned_adapter_stays_on_the_device(make_stack, tiny, tmp_path):
    stack, root = make_stack({f"n{i}": i for i in range(6)}, max_device_adapters=3, max_host_adapters=2)
    write_adapter(tmp_path / "pin", tiny.shape, seed=99)
    assert stack.adapters.manager.load("p", str(tmp_path / "pin"), pinned=True).pinned
    run_engine(stack.engine, request("p0", PROMPTS[0], "p"))
    results = submit_all(stack.engine, [request(f"r{i}", PROMPTS[i % 4], f"n{i % 6}") for i in range(24)])
    assert all(not isinstance(r, Exception) for r in results.values())
    assert "p" in stack.slots.resident()
    assert stack.store.get("p").tier is Tier.DEVICE and stack.store.get("p").weights is not None
    assert stack.adapters.manager.load("q", str(tmp_path / "pin"), pinned=True).pinned
    with pytest.raises(PinLimit):   # a third pin would leave none of the 3 slots to the others
        stack.adapters.manager.load("r", str(tmp_path / "pin"), pinned=True)


def test_manager_checks_names_and_paths(make_stack, tiny, tmp_path):
    stack, root = make_stack({"a": 1})
    manager = stack.adapters.manager
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    write_adapter(outside, tiny.shape, seed=5)
    with pytest.raises(PathNotAllowed):
        manager.load("x", str(outside))
    with pytest.raises(PathNotAllowed):
        manager.load("x", str(root / ".." / ".." / outside.name))
    (tmp_path / "escape").symlink_to(outside)
    with pytest.raises(PathNotAllowed):
        manager.load("x", str(tmp_path / "escape"))
    with pytest.raises(PathNotAllowed):
        manager.load("x", str(tmp_path))   # a root itself is not an adapter directory
    for bad in ("", "../x", "a b", "-x", "x" * 129):
        with pytest.raises(InvalidAdminRequest):
            manager.load(bad, str(root / "a"))
    assert manager.load("rel", "adapters/a").version == 1   # relative: under the first root
    (root / "broken").mkdir()
    with pytest.raises(AdapterError, match="missing_weights|adapter_config"):
        manager.load("broken", str(root / "broken"))
    status = manager.get("broken")
    assert status.state is AdapterState.REJECTED and status.error is not None
    assert [s.name for s in manager.list()] == ["a", "broken", "rel"]
