"""No silent wrong answers (tiny model, real gRPC): an adapter whose weights lie beyond any trained range is refused
at load; one that passes the load checks but drives its rows' logits to NaN/Inf fails its own requests with a clear
INTERNAL status, counted on the adapter and in the metrics, while the other requests in its batches get exactly
their normal outputs and the server keeps serving."""

from __future__ import annotations

import json
import threading

import grpc
import pytest
from safetensors.torch import load_file, save_file

from adapters_store import AdapterError, ModelSpec, load_adapter
from deltaserve.v1 import adapters_pb2 as apb
from deltaserve.v1 import adapters_pb2_grpc as apb_grpc
from deltaserve.v1 import generation_pb2 as pb
from server.model.loader import load_model
from tests.helpers import ServerThread
from tests.hotload_helpers import PROMPTS, offline_tokens, write_adapter
from tests.metrics_scrape import scrape

TOKENS = 8


@pytest.fixture(scope="module")
def offline(tiny_model_dir, cache_dir):
    return load_model(str(tiny_model_dir), cache_dir, "cpu", "float32")


def _scale_weights(adapter_dir, factor: float) -> None:
    path = adapter_dir / "adapter_model.safetensors"
    save_file({k: v * factor for k, v in load_file(str(path)).items()}, str(path))


def _set_alpha(adapter_dir, alpha: float) -> None:
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config["lora_alpha"] = alpha
    path.write_text(json.dumps(config))


def test_weights_beyond_any_trained_range_are_refused_at_load(offline, tmp_path):
    spec = ModelSpec.from_hf_model(offline.model)
    path = write_adapter(tmp_path / "huge", offline.shape, seed=1)
    _scale_weights(path, 1e19)
    with pytest.raises(AdapterError, match="beyond 65504") as info:
        load_adapter("huge", path, spec)
    assert info.value.reason == "out_of_range"


def _generate(server: ServerThread, name: str, prompt: str) -> pb.GenerateResponse:
    return server.stub.Generate(pb.GenerateRequest(text=prompt, adapter_id=name, stopping=pb.StoppingCriteria(
        max_new_tokens=TOKENS, ignore_eos=True)))


def test_non_finite_rows_fail_alone_and_are_reported(offline, tiny_model_dir, cache_dir, tmp_path):
    root = tmp_path / "adapters"
    good = write_adapter(root / "good", offline.shape, seed=2)
    blowup = write_adapter(root / "blowup", offline.shape, seed=3)
    _set_alpha(blowup, 1e30)  # finite, in-range weights; the scaled delta overflows attention to NaN
    want = {name: offline_tokens(offline, path, PROMPTS, TOKENS) for name, path in (("", None), ("good", good))}
    with ServerThread(model=str(tiny_model_dir), cache_dir=cache_dir, device="cpu", adapters_dir=str(root),
                      adapters_poll_interval=0, kv_cache_tokens=4096, metrics_port=0) as server:
        calls = [(name, p) for p in range(len(PROMPTS)) for name in ("", "good", "blowup")]
        results: dict[tuple[str, int], pb.GenerateResponse | grpc.RpcError] = {}

        def call(name: str, p: int) -> None:
            try:
                results[name, p] = _generate(server, name, PROMPTS[p])
            except grpc.RpcError as error:
                results[name, p] = error

        threads = [threading.Thread(target=call, args=c) for c in calls]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for (name, p), result in results.items():
            if name == "blowup":
                assert isinstance(result, grpc.RpcError) and result.code() == grpc.StatusCode.INTERNAL
                assert "non-finite logits" in result.details() and "'blowup' version 1" in result.details()
            else:
                assert not isinstance(result, grpc.RpcError), result
                assert list(result.token_ids) == want[name][p], (name, p)
        info = apb_grpc.AdaptersStub(server.channel).GetAdapter(apb.GetAdapterRequest(name="blowup")).adapter
        assert info.nonfinite_outputs == len(PROMPTS) and info.state == apb.ADAPTER_STATE_READY
        metrics = scrape(server.metrics_url)
        assert metrics.value("deltaserve_nonfinite_outputs_total", method="lora") == len(PROMPTS)
        assert metrics.value("deltaserve_requests_total", outcome="failed", finish_reason="cancelled") == len(PROMPTS)
        assert list(_generate(server, "good", PROMPTS[0]).token_ids) == want["good"][0]   # still serving
