"""Residency when an adapter's shared keys/values (a prefix) find too few free KV blocks: it waits without being
copied into a slot again, or evicting an idle adapter, at every step until they fit."""

from __future__ import annotations

import shutil
import time

from server.app import build_stack
from server.config import ServerConfig
from server.engine.residency import Binding
from server.model.loader import load_model
from tests.fixtures.hub import MODEL_DIR, hub_model
from tests.fixtures.mixed import byte_tokenizer
from tests.store_fixtures import make_peft_lora
from tests.test_store_prefix import make_peft_prefix


def _bind(slots, lease) -> Binding:  # noqa: ANN001
    """bind, once the adapter's weights are in memory."""
    deadline = time.monotonic() + 30
    while True:
        slots.start_step(decoding=False)
        outcome = slots.bind(lease)
        if outcome != Binding.NEEDS_FETCH or time.monotonic() > deadline:
            return outcome
        time.sleep(0.01)


def test_a_prefix_short_of_blocks_is_not_placed_again_until_they_fit(tmp_path, cache_dir):
    model_dir = shutil.copytree(MODEL_DIR, tmp_path / "model")
    byte_tokenizer().save_pretrained(model_dir)
    adapters = tmp_path / "adapters"
    make_peft_prefix(hub_model(), adapters / "prefix", seed=1, tokens=30, projection=False)
    make_peft_lora(hub_model(), adapters / "lora", seed=2, r=4, lora_alpha=8, target_modules=["q_proj"])
    config = ServerConfig(model=str(model_dir), adapters_dir=str(adapters), kv_cache_tokens=64, block_size=4,
                          max_device_adapters=1, adapters_poll_interval=0, warmup=False)
    stack = build_stack(load_model(str(model_dir), cache_dir, "cpu", "float32"), config)
    slots, blocks, deltas = stack.slots, stack.engine.blocks, stack.deltas
    placed: list[list[str]] = []
    place = deltas.place
    deltas.place = lambda slot, parts: placed.append(sorted(parts)) or place(slot, parts)

    lora = slots.reserve("lora")
    assert _bind(slots, lora) == Binding.BOUND
    slots.release(lora)                     # resident and idle
    held = blocks.pin(40)                   # 6 of 16 blocks left: 24 tokens, the prefix has 30
    prefix = slots.reserve("prefix")
    assert _bind(slots, prefix) == Binding.NEEDS_BLOCKS    # placed (the idle LoRA's slot taken), then given back
    lora = slots.reserve("lora")
    assert _bind(slots, lora) == Binding.BOUND
    slots.release(lora)
    for _ in range(3):                      # steps while the blocks are short: no copy, no eviction
        assert _bind(slots, prefix) == Binding.NEEDS_BLOCKS
    assert placed == [["lora"], ["prefix"], ["lora"]]
    assert slots.resident() == {"lora": 0}   # the idle LoRA kept its slot
    blocks.unpin(held)
    assert _bind(slots, prefix) == Binding.BOUND
    assert placed == [["lora"], ["prefix"], ["lora"], ["prefix"]]
    slots.release(prefix)
