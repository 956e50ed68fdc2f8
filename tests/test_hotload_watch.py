"""Watching --adapters-dir through a real server (tiny model): a new directory is served, a
half-written one is not, changed files make a new version, a removed directory goes once its requests end."""

from __future__ import annotations

import shutil
import threading
import time

import grpc
import pytest

from deltaserve.v1 import adapters_pb2 as apb
from deltaserve.v1 import adapters_pb2_grpc as apb_grpc
from deltaserve.v1 import generation_pb2 as pb
from server.model.loader import load_model
from tests.helpers import ServerThread
from tests.hotload_helpers import PROMPTS, offline_tokens, wait_until, write_adapter

TOKENS = 12


@pytest.fixture(scope="module")
def offline(tiny_model_dir, cache_dir):
    return load_model(str(tiny_model_dir), cache_dir, "cpu", "float32")


@pytest.fixture
def watched(tiny_model_dir, cache_dir, tmp_path):
    root = tmp_path / "adapters"
    root.mkdir()
    with ServerThread(model=str(tiny_model_dir), cache_dir=cache_dir, device="cpu", adapters_dir=str(root),
                      adapters_poll_interval=0.5, kv_cache_tokens=4096) as server:
        yield server, root, apb_grpc.AdaptersStub(server.channel)


def _generate(server: ServerThread, name: str, prompt: str = PROMPTS[0], tokens: int = TOKENS) -> pb.GenerateResponse:
    return server.stub.Generate(pb.GenerateRequest(text=prompt, adapter_id=name, stopping=pb.StoppingCriteria(
        max_new_tokens=tokens, ignore_eos=True)))


def _servable(server: ServerThread, name: str) -> bool:
    try:
        _generate(server, name, tokens=1)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.NOT_FOUND
        return False
    return True


def test_new_directory_is_served(watched, offline, tmp_path):
    server, root, _ = watched
    reference = write_adapter(tmp_path / "ref", offline.shape, seed=3)
    write_adapter(root / "fresh", offline.shape, seed=3)   # written in place, not renamed in
    wait_until(lambda: _servable(server, "fresh"), timeout=60.0)  # a bound against hanging, not a speed target
    response = _generate(server, "fresh")
    assert list(response.token_ids) == offline_tokens(offline, reference, PROMPTS[:1], TOKENS)[0]


def test_half_written_directory_is_not_picked_up(watched, offline, tmp_path):
    server, root, stub = watched
    complete = write_adapter(tmp_path / "complete", offline.shape, seed=4)
    data = (complete / "adapter_model.safetensors").read_bytes()
    target = root / "slow"
    target.mkdir()
    shutil.copy(complete / "adapter_config.json", target)
    weights = target / "adapter_model.safetensors"
    chunk = len(data) // 8 + 1
    for i in range(0, len(data), chunk):   # a slow copy: a piece every 0.3 s, never still for a whole poll
        with weights.open("ab") as out:
            out.write(data[i:i + chunk])
        if i + chunk < len(data):
            assert not _servable(server, "slow")
            time.sleep(0.3)
    wait_until(lambda: _servable(server, "slow"), timeout=2.0)
    assert list(_generate(server, "slow").token_ids) == offline_tokens(offline, complete, PROMPTS[:1], TOKENS)[0]
    info = stub.GetAdapter(apb.GetAdapterRequest(name="slow")).adapter
    assert (info.version, info.source) == (1, "dir")   # never loaded from a partial file


def test_stable_but_incomplete_directory_is_rejected_then_retried(watched, offline, tmp_path):
    server, root, stub = watched
    complete = write_adapter(tmp_path / "complete", offline.shape, seed=5)
    (root / "later").mkdir()
    shutil.copy(complete / "adapter_config.json", root / "later")
    wait_until(lambda: stub.GetAdapter(apb.GetAdapterRequest(name="later")).adapter.state ==
               apb.ADAPTER_STATE_REJECTED if "later" in _names(stub) else False, timeout=3.0)
    assert stub.GetAdapter(apb.GetAdapterRequest(name="later")).adapter.error.reason == "missing_weights"
    assert not _servable(server, "later")
    shutil.copy(complete / "adapter_model.safetensors", root / "later")
    wait_until(lambda: _servable(server, "later"), timeout=2.0)


def _names(stub: apb_grpc.AdaptersStub) -> set[str]:
    return {a.name for a in stub.ListAdapters(apb.ListAdaptersRequest()).adapters}


def test_changed_files_become_a_new_version(watched, offline, tmp_path):
    server, root, _ = watched
    write_adapter(root / "a", offline.shape, seed=6)
    wait_until(lambda: _servable(server, "a"), timeout=2.0)
    assert _generate(server, "a").adapter_version == 1
    shutil.rmtree(root / "a")
    write_adapter(root / "a", offline.shape, seed=7)
    reference = write_adapter(tmp_path / "a-v2", offline.shape, seed=7)
    wait_until(lambda: _generate(server, "a", tokens=1).adapter_version == 2, timeout=2.5)
    assert list(_generate(server, "a").token_ids) == offline_tokens(offline, reference, PROMPTS[:1], TOKENS)[0]


def test_removed_directory_goes_once_its_requests_end(watched, offline, tmp_path):
    server, root, stub = watched
    reference = write_adapter(tmp_path / "ref", offline.shape, seed=8)
    write_adapter(root / "going", offline.shape, seed=8)
    wait_until(lambda: _servable(server, "going"), timeout=2.0)
    server.engine.on_step = lambda seqs: time.sleep(0.01)   # the stream must outlast the removal's detection
    stream = server.stub.GenerateStream(pb.GenerateRequest(text=PROMPTS[1], adapter_id="going",
                                        stopping=pb.StoppingCriteria(max_new_tokens=400, ignore_eos=True)))
    events = [next(stream)]
    rest = threading.Thread(target=lambda: events.extend(stream))
    rest.start()
    shutil.rmtree(root / "going")
    wait_until(lambda: not _servable(server, "going"), timeout=2.0)   # refused while its stream still runs
    assert rest.is_alive() and stub.GetAdapter(apb.GetAdapterRequest(name="going")).adapter.state == \
        apb.ADAPTER_STATE_UNLOADING
    rest.join(timeout=120)
    server.engine.on_step = None
    final = events[-1].final
    assert list(final.token_ids) == offline_tokens(offline, reference, PROMPTS[1:2], 400)[0]
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetAdapter(apb.GetAdapterRequest(name="going"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
