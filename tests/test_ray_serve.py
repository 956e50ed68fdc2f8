"""Issue 15: deltaserve on Ray Serve, on a local 2-replica CPU cluster.

1. Mixed concurrent requests for 6 adapters over gRPC (through Ray's gRPC proxy) and HTTP (the openai client) give
   the single-node server's greedy answers; after warm-up each adapter's requests land on the one replica that
   holds it, with no adapter loads, while the same mix without the routing key loads adapters again and again.
2. Killing a replica's process mid-load: its streams end UNAVAILABLE, its unary requests are sent again and answer
   right, the other replica's requests are untouched, new requests succeed, and Ray starts a new replica."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

pytest.importorskip("ray.serve")

from clients.client import DeltaClient  # noqa: E402
from clients.messages import build_request  # noqa: E402
from tests.helpers import ServerThread  # noqa: E402
from tests.ray_cluster import APP, LocalRayServe, serve_config  # noqa: E402
from tests.ray_traffic import (  # noqa: E402
    ADAPTERS,
    LONG_TOKENS,
    PROMPTS,
    Ask,
    answers,
    make_store,
    mix,
    openai_client,
    replica_stats,
    requests_by_replica,
    total_loads,
)

ENGINE = {"threads": 1, "kv_cache_tokens": 4096, "max_batch_size": 32}
KEY = "ray-test-key"   # the cluster's API key: every client call below carries it


def _long_asks() -> list[Ask]:
    return [Ask(adapter, PROMPTS[1], LONG_TOKENS) for adapter in ADAPTERS]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    return make_store(tmp_path_factory.mktemp("ray-store"), default_model_dir)


@pytest.fixture(scope="module")
def reference(store: Path, cache_dir: str) -> dict[tuple[str, Ask], str]:
    """The single-node server's answers (gRPC and HTTP) to every request the tests send; stopped before Ray
    starts, so the two never share the cores."""
    with ServerThread(model="default", cache_dir=cache_dir, adapters_dir=str(store), adapters_poll_interval=0,
                      **ENGINE) as server:
        asks = mix() + _long_asks()
        grpc_texts, http_texts = answers(asks, server.target, server.http_url)
    by_grpc = {("grpc", ask): text for ask, text in zip(asks, grpc_texts, strict=True)}
    return {**by_grpc, **{("http", ask): text for ask, text in zip(asks, http_texts, strict=True)}}


@pytest.fixture(scope="module")
def cluster(reference: Any, store: Path, tmp_path_factory: pytest.TempPathFactory) -> LocalRayServe:
    engine = {name: value for name, value in ENGINE.items() if name != "threads"}   # from num_cpus: 1
    config = serve_config(tmp_path_factory.mktemp("ray-config") / "serve.yaml", store, replicas=2, max_adapters=4,
                          api_key=KEY, **engine)
    running = LocalRayServe(config).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def figures() -> dict[str, float]:
    """Loads per request measured by one test, compared by another."""
    return {}


def test_affinity_same_answers_and_no_loads(cluster: LocalRayServe, reference: dict, figures: dict) -> None:
    with DeltaClient(cluster.grpc_target, timeout=300, ray=True, api_key=KEY) as client:
        for adapter in ADAPTERS:   # warm-up: each adapter once, so each is on a replica
            ask = Ask(adapter, PROMPTS[0])
            assert ask.grpc(client) == reference["grpc", ask]
    engine = cluster.engine()
    before = replica_stats(engine, 2)
    asks = mix() * 2
    grpc_texts, http_texts = answers(asks, cluster.grpc_target, cluster.http_url, ray=True, api_key=KEY)
    after = replica_stats(engine, 2)
    assert [stats["threads"] for stats in after.values()] == [1, 1]   # the replica's CPUs, not the node's
    assert grpc_texts == [reference["grpc", a] for a in asks]
    assert http_texts == [reference["http", a] for a in asks]
    for adapter in ADAPTERS:
        counts = requests_by_replica(before, after, adapter)
        holders = [replica for replica, count in counts.items() if count]
        assert sum(counts.values()) == 8, counts   # 2 prompts, twice, over both protocols
        assert len(holders) == 1 and adapter in after[holders[0]]["resident"], (adapter, counts, after)
    loads = total_loads(after) - total_loads(before)
    assert loads == 0, after
    figures["affinity"] = loads / (len(ADAPTERS) * 8)
    print(f"\naffinity: {loads} adapter loads for {len(ADAPTERS) * 8} adapter requests; per replica:",
          {replica: stats["requests"] for replica, stats in after.items()})


def test_stock_clients_errors_health_and_info(cluster: LocalRayServe, reference: dict) -> None:
    """A stock gRPC client (no routing metadata) is routed by its adapter_id; metadata that disagrees with it is
    refused; unknown adapters are NOT_FOUND / 404 and a missing API key UNAUTHENTICATED / 401, as on one node;
    health and ModelInfo answer through the proxy."""
    from openai import AuthenticationError, NotFoundError

    ask = Ask(ADAPTERS[0], PROMPTS[0])
    with DeltaClient(cluster.grpc_target, timeout=300) as keyless:
        with pytest.raises(grpc.RpcError) as refused:
            ask.grpc(keyless)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert keyless.health() == "SERVING"
    with pytest.raises(AuthenticationError):
        ask.http(openai_client(cluster.http_url))
    with DeltaClient(cluster.grpc_target, timeout=300, api_key=KEY) as stock:
        assert ask.grpc(stock) == reference["grpc", ask]
        assert stock.health() == "SERVING"
        assert stock.model_info()["model_id"] == "SmolLM2-135M-Instruct"
        with pytest.raises(grpc.RpcError) as unknown:
            Ask("no-such-adapter", PROMPTS[0]).grpc(stock)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    with DeltaClient(cluster.grpc_target, timeout=300, api_key=KEY,
                     metadata=[("multiplexed_model_id", ADAPTERS[1])]) as wrong:
        with pytest.raises(grpc.RpcError) as mismatch:
            ask.grpc(wrong)
        assert mismatch.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    openai = openai_client(cluster.http_url, KEY)
    with pytest.raises(NotFoundError):
        Ask("no-such-adapter", PROMPTS[0]).http(openai)
    assert {model.id for model in openai.models.list().data} == {"SmolLM2-135M-Instruct", *ADAPTERS}


def _busy(engine: Any) -> int:
    """Requests running or waiting on the busiest replica (ModelInfo asked often enough to reach every one)."""
    infos = [engine.model_info.remote().result(timeout_s=30) for _ in range(16)]
    return max(info.running_requests + info.waiting_requests for info in infos)


def _steps(engine: Any) -> int:
    """Engine steps run so far, every replica together (an idle engine runs none)."""
    return sum(stats["steps"] for stats in replica_stats(engine, 2).values())


def _ended_early(engine: Any, steps_before: int, max_tokens: int) -> bool:
    """Waits until no replica runs or queues a request (a request nobody cancelled ends by itself, after its
    max_tokens), then says whether it ended before taking a step per token."""
    while _busy(engine):
        time.sleep(0.5)
    return _steps(engine) - steps_before < max_tokens


def test_a_client_going_away_ends_its_generation(cluster: LocalRayServe) -> None:
    """Closing an HTTP stream or cancelling a gRPC stream ends the request on its replica (the ingress cancels the
    handle call; the replica's app or servicer sees the disconnect)."""
    import httpx

    engine = cluster.engine()
    steps = _steps(engine)
    body = {"model": ADAPTERS[0], "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60, headers={"authorization": f"Bearer {KEY}"}) as http, \
            http.stream("POST", cluster.http_url + "/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()
        next(lines)
        assert _busy(engine) == 1
    assert _ended_early(engine, steps, 3000), "a replica kept generating for an HTTP client that went away"
    steps = _steps(engine)
    with DeltaClient(cluster.grpc_target, timeout=60, api_key=KEY) as client:
        stream = client.generate_stream("Tell me a long story.", adapter=ADAPTERS[1], max_new_tokens=3000,
                                        ignore_eos=True)
        next(stream)
        assert _busy(engine) == 1
        stream.cancel()
    assert _ended_early(engine, steps, 3000), "a replica kept generating for a gRPC client that went away"


def _exclusive(stats: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """The adapters resident on each replica and on no other."""
    return {replica: [a for a in s["resident"] if all(a not in o["resident"] for r, o in stats.items() if r != replica)]
            for replica, s in stats.items()}


def _stream_outcome(stream: Any) -> grpc.StatusCode:
    try:
        for _ in stream:
            pass
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_replica_death_retried_or_unavailable(cluster: LocalRayServe, reference: dict) -> None:
    from ray import serve

    engine = cluster.engine()
    before = replica_stats(engine, 2)
    exclusive = _exclusive(before)
    victim = max(exclusive, key=lambda replica: len(exclusive[replica]))
    survivor = next(replica for replica in before if replica != victim)
    doomed, safe = exclusive[victim], exclusive[survivor]
    assert doomed and safe, before
    openai = openai_client(cluster.http_url, KEY)
    with DeltaClient(cluster.grpc_target, timeout=300, ray=True, api_key=KEY) as client, ThreadPoolExecutor(16) as pool:
        streams = []
        for adapter in doomed:   # in flight on the victim: each has its first token
            request = {"messages": [{"role": "user", "content": PROMPTS[0]}], "adapter": adapter,
                       "max_new_tokens": 8 * LONG_TOKENS, "ignore_eos": True}
            streams.append(client.generate_stream(**request))
            next(streams[-1])
        unary = {ask: pool.submit(ask.grpc, client) for ask in _long_asks() if ask.adapter in doomed + safe}
        http = {ask: pool.submit(ask.http, openai) for ask in _long_asks() if ask.adapter in doomed}
        time.sleep(0.3)
        os.kill(before[victim]["pid"], signal.SIGKILL)
        outcomes = [_stream_outcome(stream) for stream in streams]
        assert set(outcomes) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.OK} and grpc.StatusCode.UNAVAILABLE \
            in outcomes, outcomes
        for ask, future in unary.items():    # the victim's sent again, the survivor's untouched
            assert future.result() == reference["grpc", ask], ask
        for ask, future in http.items():
            assert future.result() == reference["http", ask], ask
        for adapter in doomed:               # new requests: on the survivor
            ask = Ask(adapter, PROMPTS[1])
            assert ask.grpc(client) == reference["grpc", ask]
    deadline = time.monotonic() + 120
    while True:   # Ray starts a new replica in the victim's place
        now = replica_stats(engine, 2, timeout=120)
        if victim not in now and survivor in now:
            break
        assert time.monotonic() < deadline, now
        time.sleep(1)
    replacement = next(replica for replica in now if replica != survivor)
    assert now[replacement]["pid"] != before[victim]["pid"]
    # The doomed adapters' requests the living replicas served: the new ones, and those sent again after the kill.
    served = sum(requests_by_replica(before, now, adapter)[replica] for adapter in doomed for replica in now)
    retried = served - len(doomed)
    failover = serve.get_deployment_handle("DeltaIngress", APP).stats.remote().result(timeout_s=30)
    assert failover["lost_mid_stream"] == len(doomed) and failover["gave_up"] == 0, failover
    assert failover["sent_again"] >= 1 and retried >= 1, (failover, served, now)
    print(f"\nkilled {victim} (pid {before[victim]['pid']}); stream outcomes {[o.name for o in outcomes]}; "
          f"{len(unary) + len(http)} unary requests all answered, {retried} on the living replicas, "
          f"{failover['sent_again']} sent again by the ingress; "
          f"replacement {replacement}")


def test_without_affinity_loads_far_more(cluster: LocalRayServe, reference: dict, figures: dict) -> None:
    """The same kind of mix sent to the engine deployment without the routing key (what Ray does for a request
    with no model id: power of two choices on queue length), 16 at a time."""
    engine = cluster.engine()
    before = replica_stats(engine, 2)
    asks = [ask for ask in mix() * 4 if ask.adapter]
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda ask: engine.generate.remote(build_request(
            messages=[{"role": "user", "content": ask.prompt}], adapter=ask.adapter, max_new_tokens=ask.tokens,
            ignore_eos=True)).result(timeout_s=300), asks))
    after = replica_stats(engine, 2)
    assert [reply.text for reply in replies] == [reference["grpc", ask] for ask in asks]
    loads = total_loads(after) - total_loads(before)
    per_request = loads / len(asks)
    for stats in after.values():   # Ray's LRU evicted, and an evicted adapter left the engine too
        assert len(stats["resident"]) <= 4 and stats["registered"] == stats["resident"], stats
    assert sum(stats["evictions"] for stats in after.values()) > 0
    print(f"\nwithout affinity: {loads} adapter loads for {len(asks)} adapter requests ({per_request:.2f}/request); "
          f"with affinity: {figures.get('affinity')}/request")
    assert loads >= 4 and per_request >= 4 * max(figures.get("affinity", 0.0), 1 / len(asks))


# --- no cluster needed ----------------------------------------------------------------------------------------


def test_application_arguments_are_checked_before_any_replica(tmp_path: Path) -> None:
    from server.ray.settings import RayAppSettings

    for bad, reason in [({"replicas": 2}, "unknown deltaserve application argument"),
                        ({"engine": {"port": 5}}, "decided by the Ray application"),
                        ({"engine": {"max_batch_size": 0}}, "max_batch_size must be positive"),
                        ({"engine": {"no_such": 1}}, "unknown engine setting"),
                        ({"adapters_store": str(tmp_path / "missing")}, "is not a directory"),
                        ({"max_adapters_per_replica": 0}, "max_adapters_per_replica")]:
        with pytest.raises(ValueError, match=reason):
            RayAppSettings.from_args(bad)
    config = RayAppSettings.from_args({"adapters_store": str(tmp_path), "max_adapters_per_replica": 5,
                                       "engine": {"threads": 1}}).server_config()
    assert (config.adapters_dir, config.adapters_load_root, config.http_port, config.metrics_port) == \
        ("", str(tmp_path), -1, -1)
    assert (config.max_device_adapters, config.threads) == (5, 1)


def test_config_file_is_read_and_the_cli_refuses_a_bad_one(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from server.cli import main
    from server.ray.launch import read_config

    config = read_config(Path(__file__).resolve().parents[1] / "deploy" / "ray" / "serve.yaml")
    assert Path(config.applications[0].args["adapters_store"]).is_absolute()
    (tmp_path / "bad.yaml").write_text("applications: [{import_path: elsewhere:app}]\n")
    assert main(["ray-serve", str(tmp_path / "bad.yaml")]) == 2
    assert "no application has import_path 'server.ray.app:build_app'" in capsys.readouterr().err
    assert main(["ray-serve", str(tmp_path / "missing.yaml")]) == 2


def test_clients_send_the_routing_metadata_only_for_ray() -> None:
    from clients.channel import routing
    from clients.cli import build_parser

    assert routing("shout", True) == (("multiplexed_model_id", "shout"),)
    assert routing("", True) == routing("shout", False) == ()
    assert build_parser().parse_args(["generate", "--ray", "hi"]).ray is True


def test_simulation_affinity_loads_less_than_round_robin(tmp_path: Path) -> None:
    from benchmarks.affinity_sim import SimConfig, run

    rows = run(SimConfig(adapters=500, replicas=4, slots=8, requests=6000, warmup=2000), [4])
    by_policy = {row["policy"]: row for row in rows}
    assert by_policy["affinity"]["load_rate"] < by_policy["round-robin"]["load_rate"]
    assert all(row["balance"] >= 1.0 for row in rows)
