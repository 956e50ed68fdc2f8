"""Issue 12, acceptance 3 and the HTTP API's guards: a full queue is 429, a client that disconnects frees its KV at
once, API keys (401), the /v1/adapters admin operations behind --admin-token, /health 503 once shutting down."""

from __future__ import annotations

import asyncio
import threading

import httpx
import openai
import pytest

from tests.helpers import ServerThread
from tests.hotload_helpers import wait_until
from tests.openai_fixtures import MODEL_ID, default_shape, write_peft_prefix

pytestmark = pytest.mark.integration

KEY = "test-key-1"
ADMIN = "admin-token-1"


@pytest.fixture(scope="module")
def load_root(tmp_path_factory, default_model_dir):
    root = tmp_path_factory.mktemp("openai-load-root")
    write_peft_prefix(root / "prefix", default_shape(default_model_dir), 4, seed=3)
    return root


@pytest.fixture(scope="module")
def served(cache_dir, load_root):
    with ServerThread(model="default", cache_dir=cache_dir, max_waiting=1, max_batch_size=1, api_key=KEY,
                      admin_token=ADMIN, adapters_load_root=str(load_root), kv_cache_tokens=4096) as server:
        yield server


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served.http_url, timeout=60, headers={"authorization": f"Bearer {KEY}"}) as client:
        yield client


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_api_key_is_required(served):
    base = f"{served.http_url}/v1"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
    assert _error(httpx.get(f"{base}/models"), 401)["code"] == "invalid_api_key"
    with openai.OpenAI(base_url=base, api_key=KEY, max_retries=0) as client:
        assert [m.id for m in client.models.list()] == [MODEL_ID]
    assert httpx.get(f"{served.http_url}/health").status_code == 200     # health stays open


def test_full_queue_is_429_and_a_disconnect_frees_the_kv(served, http):
    engine = served.engine
    long = {"model": MODEL_ID, "prompt": "Count: 1, 2, 3,", "max_tokens": 300, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=long) as running:
        lines = running.iter_lines()
        assert next(line for line in lines if line.startswith("data: ")).startswith("data: {")   # a first token
        waiting: list[httpx.Response] = []
        short = {"model": MODEL_ID, "prompt": "Hi", "max_tokens": 3}
        thread = threading.Thread(target=lambda: waiting.append(http.post("/v1/completions", json=short)))
        thread.start()
        wait_until(lambda: engine.stats().waiting == 1, timeout=30)
        full = _error(http.post("/v1/completions", json=short), 429)
        assert full["code"] == "queue_full"
    # The stream's client went away: its request is cancelled, so the waiting one runs and ends.
    thread.join(timeout=60)
    assert waiting and waiting[0].status_code == 200
    wait_until(lambda: engine.stats().running == 0 and engine.stats().free_blocks == engine.stats().total_blocks,
               timeout=30)


def test_admin_adapters_behind_the_admin_token(served, http, load_root):
    assert _error(http.get("/v1/adapters"), 401)["code"] == "invalid_admin_token"    # the API key is not enough
    admin = {"authorization": f"Bearer {ADMIN}"}
    loaded = http.post("/v1/adapters", json={"name": "pfx", "path": str(load_root / "prefix")}, headers=admin)
    assert loaded.status_code == 200 and loaded.json()["adapter"]["state"] == "ready"
    assert [a["name"] for a in http.get("/v1/adapters", headers=admin).json()["data"]] == ["pfx"]
    models = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert models["pfx"]["parent"] == MODEL_ID
    answer = http.post("/v1/chat/completions", json={"model": f"{MODEL_ID}:pfx", "max_tokens": 3,
                                                     "messages": [{"role": "user", "content": "Hi"}]})
    assert answer.status_code == 200 and answer.json()["model"] == f"{MODEL_ID}:pfx"
    outside = http.post("/v1/adapters", json={"name": "x", "path": "/etc"}, headers=admin)
    assert _error(outside, 403)["code"] == "path_not_allowed"
    assert http.delete("/v1/adapters/pfx", headers=admin).json()["adapter"]["state"] in ("unloaded", "unloading")
    assert _error(http.delete("/v1/adapters/pfx", headers=admin), 404)["code"] == "adapter_not_found"
    gone = http.post("/v1/completions", json={"model": "pfx", "prompt": "Hi", "max_tokens": 2})
    assert _error(gone, 404)["code"] == "model_not_found"


def test_health_is_503_once_shutting_down(served, http):
    assert http.get("/health").json() == {"status": "SERVING"}
    asyncio.run_coroutine_threadsafe(served.running.grpc.health.enter_graceful_shutdown(), served.loop).result(10)
    assert http.get("/health").status_code == 503
