"""Hot-loading through real gRPC (tiny model): 16 concurrent streams while adapters are loaded, reloaded and
unloaded; the Adapters service's answers and errors; admin auth; deltactl adapters."""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass, field

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from clients.cli import main as deltactl
from deltaserve.v1 import adapters_pb2 as apb
from deltaserve.v1 import adapters_pb2_grpc as apb_grpc
from deltaserve.v1 import generation_pb2 as pb
from server.model.loader import load_model
from tests.helpers import ServerThread
from tests.hotload_helpers import PROMPTS, offline_tokens, write_adapter

NAMES = ["h0", "h1", "h2", "h3"]
VARIANTS = 3
STREAM_TOKENS = 16
TOKEN = "s3cret-token"
ROUNDS = 60      # admin operations
PER_PHASE = 4    # requests finished before each
PER_GAP = 2      # requests finished while an unloaded name is away


@pytest.fixture(scope="module")
def offline(tiny_model_dir, cache_dir):
    return load_model(str(tiny_model_dir), cache_dir, "cpu", "float32")


@pytest.fixture(scope="module")
def library(tmp_path_factory, offline):
    """NAMES x VARIANTS adapter directories under one load root, with every prompt's offline tokens."""
    root = tmp_path_factory.mktemp("library")
    expected = {}
    for n, name in enumerate(NAMES):
        for v in range(VARIANTS):
            path = write_adapter(root / f"{name}-v{v}", offline.shape, seed=100 * n + v)
            expected[path.name] = offline_tokens(offline, path, PROMPTS, STREAM_TOKENS)
    return root, expected


def _stream_request(name: str, prompt: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(text=prompt, adapter_id=name,
                              stopping=pb.StoppingCriteria(max_new_tokens=STREAM_TOKENS, ignore_eos=True))


@dataclass
class Timeline:
    """What the admin thread did: which variant each (name, version) holds, when each name was not served."""

    variant_of: dict[tuple[str, int], str] = field(default_factory=dict)
    gaps: dict[str, list[list[float]]] = field(default_factory=dict)   # [start, end] of unserved periods
    reloads_while_running: int = 0
    ready: threading.Event = field(default_factory=threading.Event)   # every name loaded once

    def unserved_during(self, name: str, start: float, end: float) -> bool:
        return any(s <= end and (e is None or e >= start) for s, e in self.gaps.get(name, []))


class Progress:
    """Finished requests, counted, so the admin's phases are paced by requests rather than by the clock."""

    def __init__(self) -> None:
        self.done = 0
        self.changed = threading.Condition()

    def finished(self) -> None:
        with self.changed:
            self.done += 1
            self.changed.notify_all()

    def wait_for(self, more: int) -> None:
        with self.changed:
            target = self.done + more
            assert self.changed.wait_for(lambda: self.done >= target, timeout=300), "clients stopped finishing"


def _admin(stub: apb_grpc.AdaptersStub, root, timeline: Timeline, stop: threading.Event, progress: Progress,
           rng: random.Random) -> None:
    def load(name: str) -> None:
        variant = f"{name}-v{rng.randrange(VARIANTS)}"
        info = stub.LoadAdapter(apb.LoadAdapterRequest(name=name, path=str(root / variant))).adapter
        timeline.variant_of[(name, info.version)] = variant
        if timeline.gaps.get(name) and timeline.gaps[name][-1][1] is None:
            timeline.gaps[name][-1][1] = time.monotonic()

    try:
        for name in NAMES:
            load(name)
        timeline.ready.set()
        for _ in range(ROUNDS):
            progress.wait_for(PER_PHASE)
            name = rng.choice(NAMES)
            if rng.random() < 0.3:
                timeline.gaps.setdefault(name, []).append([time.monotonic(), None])
                stub.UnloadAdapter(apb.UnloadAdapterRequest(name=name))
                progress.wait_for(PER_GAP)
            else:
                info = stub.GetAdapter(apb.GetAdapterRequest(name=name)).adapter
                timeline.reloads_while_running += info.in_flight > 0
            load(name)
    finally:
        stop.set()


def _client(server: ServerThread, stop: threading.Event, progress: Progress, rng: random.Random,
            outcomes: list) -> None:
    while not stop.is_set():
        name, p = rng.choice(NAMES), rng.randrange(len(PROMPTS))
        start = time.monotonic()
        try:
            events = list(server.stub.GenerateStream(_stream_request(name, PROMPTS[p])))
            final = events[-1].final
            streamed = [t for e in events if e.HasField("token") for t in e.token.token_ids]
            assert streamed == list(final.token_ids)
            outcomes.append(("ok", name, p, final.adapter_version, list(final.token_ids), start, time.monotonic()))
        except grpc.RpcError as error:
            outcomes.append(("error", name, p, error.code(), error.details(), start, time.monotonic()))
        progress.finished()


def test_sixteen_streams_while_adapters_load_reload_and_unload(tiny_model_dir, cache_dir, library):
    """ROUNDS admin operations, each after PER_PHASE more requests finished (an unloaded name stays away for
    PER_GAP requests): the pace is set by counts, so any machine runs the same scenario."""
    root, expected = library
    timeline, stop, progress, outcomes = Timeline(), threading.Event(), Progress(), []
    with ServerThread(model=str(tiny_model_dir), cache_dir=cache_dir, device="cpu", adapters_load_root=str(root),
                      max_device_adapters=4, max_host_adapters=4, max_batch_size=16, kv_cache_tokens=4096) as server:
        stub = apb_grpc.AdaptersStub(server.channel)
        admin = threading.Thread(target=_admin, args=(stub, root, timeline, stop, progress, random.Random(7)))
        admin.start()
        assert timeline.ready.wait(60)
        clients = [threading.Thread(target=_client, args=(server, stop, progress, random.Random(i), outcomes))
                   for i in range(16)]
        for thread in clients:
            thread.start()
        admin.join()
        for thread in clients:
            thread.join()
        listed = stub.ListAdapters(apb.ListAdaptersRequest()).adapters
        assert all(a.in_flight == 0 and a.draining_versions == 0 for a in listed)
    assert len(outcomes) >= ROUNDS * PER_PHASE
    oks = [o for o in outcomes if o[0] == "ok"]
    for _, name, p, version, tokens, _, _ in oks:
        variant = timeline.variant_of[(name, version)]
        assert tokens == expected[variant][p], f"{name} v{version} ({variant}), prompt {p}"
    unexpected = [o for o in outcomes if o[0] == "error"
                  and not (o[3] == grpc.StatusCode.NOT_FOUND and timeline.unserved_during(o[1], o[5], o[6]))]
    assert not unexpected, unexpected[:5]
    assert len({(o[1], o[3]) for o in oks}) >= 2 * len(NAMES)       # several versions of every name served
    assert timeline.reloads_while_running >= 5                        # reloads really hit running requests


@pytest.fixture(scope="module")
def guarded(tiny_model_dir, cache_dir, library):
    root, _ = library
    with ServerThread(model=str(tiny_model_dir), cache_dir=cache_dir, device="cpu", adapters_load_root=str(root),
                      admin_token=TOKEN, max_device_adapters=2, kv_cache_tokens=2048) as server:
        yield server


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code()


def test_admin_calls_need_the_token_the_rest_stays_open(guarded, library):
    root, _ = library
    stub = apb_grpc.AdaptersStub(guarded.channel)
    listing = apb.ListAdaptersRequest()
    assert _code(lambda: stub.ListAdapters(listing)) == grpc.StatusCode.UNAUTHENTICATED
    assert _code(lambda: stub.ListAdapters(listing, metadata=[("authorization", "Bearer nope")])) == \
        grpc.StatusCode.UNAUTHENTICATED
    assert _code(lambda: stub.LoadAdapter(apb.LoadAdapterRequest(name="x", path=str(root / "h0-v0")),
                                          metadata=[("authorization", TOKEN)])) == grpc.StatusCode.UNAUTHENTICATED
    assert len(stub.ListAdapters(listing, metadata=[("authorization", f"Bearer {TOKEN}")]).adapters) == 0
    health = health_pb2_grpc.HealthStub(guarded.channel)
    for service in ("", "deltaserve.v1.Adapters", "deltaserve.v1.Generation"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
            health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(guarded.channel)
    answer = next(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    assert "deltaserve.v1.Adapters" in {s.name for s in answer.list_services_response.service}
    assert len(guarded.stub.Generate(_stream_request("", PROMPTS[0])).token_ids) == STREAM_TOKENS


def test_admin_errors_map_to_status_codes(guarded, library, tmp_path):
    root, expected = library
    auth = [("authorization", f"Bearer {TOKEN}")]
    stub = apb_grpc.AdaptersStub(guarded.channel)

    def load(name: str, path: str, pinned: bool = False) -> apb.AdapterInfo:
        return stub.LoadAdapter(apb.LoadAdapterRequest(name=name, path=path, pinned=pinned), metadata=auth).adapter

    write_adapter(tmp_path / "outside", guarded.running.stack.loaded.shape, seed=1)
    assert _code(lambda: load("x", str(tmp_path / "outside"))) == grpc.StatusCode.PERMISSION_DENIED
    assert _code(lambda: load("x", "../outside")) == grpc.StatusCode.PERMISSION_DENIED
    assert _code(lambda: load("bad name", str(root / "h0-v0"))) == grpc.StatusCode.INVALID_ARGUMENT
    (root / "empty").mkdir(exist_ok=True)
    assert _code(lambda: load("empty", str(root / "empty"))) == grpc.StatusCode.INVALID_ARGUMENT
    assert load("p", str(root / "h0-v0"), pinned=True).pinned
    assert _code(lambda: load("p2", str(root / "h0-v0"), pinned=True)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    stub.UnloadAdapter(apb.UnloadAdapterRequest(name="p"), metadata=auth)
    assert _code(lambda: stub.UnloadAdapter(apb.UnloadAdapterRequest(name="nope"), metadata=auth)) == \
        grpc.StatusCode.NOT_FOUND
    assert _code(lambda: stub.GetAdapter(apb.GetAdapterRequest(name="nope"), metadata=auth)) == \
        grpc.StatusCode.NOT_FOUND
    info = load("good", "h1-v2")   # relative to the load root
    assert (info.state, info.version, info.format, list(info.methods)) == (apb.ADAPTER_STATE_READY, 1, "peft_lora",
                                                                          ["lora"])
    assert list(info.ranks) == [4] and "q_proj" in info.targets and info.parameter_count > 0 and info.bytes > 0
    assert info.tier == apb.RESIDENCY_TIER_HOST and info.loaded_at > 0 and info.last_used == 0
    result = guarded.stub.Generate(_stream_request("good", PROMPTS[2]))
    assert (list(result.token_ids), result.adapter_version) == (expected["h1-v2"][2], 1)
    info = stub.GetAdapter(apb.GetAdapterRequest(name="good"), metadata=auth).adapter
    assert info.tier == apb.RESIDENCY_TIER_DEVICE and info.last_used > 0
    rejected = stub.GetAdapter(apb.GetAdapterRequest(name="empty"), metadata=auth).adapter
    assert rejected.state == apb.ADAPTER_STATE_REJECTED and rejected.error.reason == "bad_config"
    assert stub.UnloadAdapter(apb.UnloadAdapterRequest(name="good"), metadata=auth).adapter.state == \
        apb.ADAPTER_STATE_UNLOADED
    assert _code(lambda: guarded.stub.Generate(_stream_request("good", PROMPTS[2]))) == grpc.StatusCode.NOT_FOUND
    stub.UnloadAdapter(apb.UnloadAdapterRequest(name="empty"), metadata=auth)


def test_deltactl_adapters(guarded, library, capsys, monkeypatch):
    root, _ = library
    monkeypatch.setenv("DELTASERVE_TARGET", guarded.target)
    assert deltactl(["adapters", "list"]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    monkeypatch.setenv("DELTASERVE_ADMIN_TOKEN", TOKEN)
    assert deltactl(["adapters", "load", "cli", str(root / "h2-v0"), "--json"]) == 0
    loaded = json.loads(capsys.readouterr().out)
    assert (loaded["name"], loaded["state"], loaded["version"], loaded["tier"]) == ("cli", "ready", 1, "host")
    assert deltactl(["adapters", "load", "cli", str(root / "h2-v1")]) == 0
    assert "version 2" in capsys.readouterr().out
    assert deltactl(["adapters", "list"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["NAME", "STATE", "VER", "TIER"] and table[1].split()[:3] == ["cli", "ready", "2"]
    assert deltactl(["adapters", "get", "cli", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ranks"] == [4]
    assert deltactl(["adapters", "unload", "cli", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "unloaded"
    assert deltactl(["adapters", "get", "cli"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
