"""Shared fixtures: the default model (converted once), a tiny random Llama, an in-process server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.fake_generation import client, fake, fake_server  # noqa: F401  (fixtures for the client tests)
from tests.helpers import ServerThread

# References are computed on the main thread: fix its torch thread count now, before a server's engine makes one
# thread the default for threads that start later (server/engine/threads.py).
torch.set_num_threads(os.cpu_count() or 1)
torch.get_num_threads()


@pytest.fixture(scope="session")
def cache_dir() -> str:
    # The user's cache, so the default model is converted once per machine, not once per run.
    return os.environ.get("DELTASERVE_CACHE_DIR", str(Path.home() / ".cache" / "deltaserve"))


@pytest.fixture(scope="session")
def default_model_dir(cache_dir: str) -> Path:
    from server.model.default_model import default_model_dir as convert

    return convert(cache_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    """A randomly initialised 2-layer Llama with the default model's tokenizer (so chat works)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def hf_default_model(default_model_dir: Path):  # noqa: ANN201
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def server(cache_dir: str) -> ServerThread:
    """The default model served over a real loopback socket, in this process."""
    with ServerThread(model="default", cache_dir=cache_dir) as running:
        yield running
