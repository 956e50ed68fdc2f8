"""End to end on the default model over gRPC: LoadAdapter, generate on it, reload, unload, with admin auth."""

from __future__ import annotations

import grpc
import pytest

from benchmarks.lora_fixtures import QV, write_peft_lora
from clients.client import DeltaClient
from server.model.loader import load_model
from tests.helpers import ServerThread
from tests.hotload_helpers import offline_tokens

pytestmark = pytest.mark.integration

PROMPT = "The capital of France is"
TOKENS = 24


def test_default_model_load_generate_reload_unload(cache_dir, tmp_path):
    offline = load_model("default", cache_dir, "cpu", "float32")
    library = tmp_path / "library"
    versions = [write_peft_lora(library / f"qv-{seed}", offline.shape, 8, QV, seed=seed, alpha=128.0)
                for seed in (1, 2)]
    expected = [offline_tokens(offline, path, [PROMPT], TOKENS)[0] for path in versions]
    base = offline_tokens(offline, None, [PROMPT], TOKENS)[0]
    assert expected[0] != base and expected[1] != expected[0]   # the adapters really change the answer
    with (ServerThread(model="default", cache_dir=cache_dir, device="cpu", adapters_load_root=str(library),
                       admin_token="t0k", kv_cache_tokens=4096) as server,
          DeltaClient(server.target, admin_token="t0k") as client):
        info = client.load_adapter("qv", "qv-1")
        assert (info["state"], info["version"], info["ranks"], info["targets"]) == ("ready", 1, [8],
                                                                                  ["q_proj", "v_proj"])
        result = client.generate(PROMPT, adapter="qv", max_new_tokens=TOKENS, ignore_eos=True)
        assert (result.token_ids, result.adapter_version) == (expected[0], 1)
        assert client.load_adapter("qv", "qv-2")["version"] == 2
        result = client.generate(PROMPT, adapter="qv", max_new_tokens=TOKENS, ignore_eos=True)
        assert (result.token_ids, result.adapter_version) == (expected[1], 2)
        assert client.generate(PROMPT, max_new_tokens=TOKENS, ignore_eos=True).token_ids == base
        assert client.unload_adapter("qv")["state"] == "unloaded"
        with pytest.raises(grpc.RpcError) as caught:
            client.generate(PROMPT, adapter="qv", max_new_tokens=2)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert client.list_adapters() == []
