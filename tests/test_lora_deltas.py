"""LoRA fast paths (gathered batched products, segment loop) against the slow per-row oracle."""

from __future__ import annotations

import pytest
import torch

from adapters_store.types import LoraModule, LoraParts
from server.deltas.base import DeltaLimits, DeltaRejected
from server.deltas.deltaset import DeltaSet
from server.model.loader import load_model
from tests.helpers import segment_batch

TOL = 1e-5



def _random_lora(gen: torch.Generator, shape: tuple[int, int], rank: int) -> LoraModule:
    fan_in, fan_out = shape
    return LoraModule(a=torch.randn(rank, fan_in, generator=gen), b=torch.randn(fan_out, rank, generator=gen),
                      scale=float(torch.rand(1, generator=gen)) * 4)


@pytest.fixture
def tiny(tiny_model_dir, cache_dir):
    # A fresh model per test: a DeltaSet hooks itself into the model's linears for good.
    return load_model(str(tiny_model_dir), cache_dir, "cpu", "float32")


LAYOUTS = {
    # name: (rows of each of the six adapters, base rows first, expected grouped / looped segments, unpadded)
    "one-row-each": ([1] * 6, 6, 0, True),
    "seven-rows-each": ([7] * 6, 6, 0, True),
    "uneven-padded": ([1, 3, 2, 1, 4, 2], 6, 0, False),
    "long-loop": ([20] * 6, 0, 6, False),
    "mixed": ([1, 1, 30, 2, 12, 1], 4, 2, False),   # the 12-row segment would pad the others too much
    "singles-and-a-pair": ([1, 1, 1, 1, 2, 1], 5, 1, False),   # the pair is looped, the singles grouped
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_fast_paths_equal_reference(tiny, layout):
    from server.deltas.lora_reference import lora_delta_reference

    counts, grouped, looped, unpadded = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(sum(counts))
    deltas = DeltaSet(tiny.model, DeltaLimits(num_slots=8, max_lora_rank=16))
    linears = tiny.model.adaptable_linears()
    sites = sorted(linears)
    adapters: dict[int, dict[str, LoraModule]] = {}
    for slot, rank in enumerate((2, 4, 8, 16, 3, 5)):
        # every adapter targets a different subset of sites, with its own rank
        chosen = [s for i, s in enumerate(sites) if (i + slot) % 3 != 0]
        modules = {s: _random_lora(gen, (linears[s].in_features, linears[s].out_features), rank) for s in chosen}
        adapters[slot] = modules
        deltas.place(slot, {"lora": LoraParts(modules)})
    token_slots = [-1] * 2 + [slot for slot, count in enumerate(counts) for _ in range(count)]
    batch = segment_batch(token_slots)
    deltas.prepare(batch)
    step = batch.method_state["lora"]
    assert (len(step.groups), len(step.loop), step.unpadded and grouped > 0) == (grouped, looped, unpadded)
    for site in sites:
        linear = linears[site]
        x = torch.randn(len(token_slots), linear.in_features, generator=gen)
        got = linear(x, batch)
        base = torch.nn.functional.linear(x, linear.weight, linear.bias)
        want = base + lora_delta_reference(x, [adapters[s].get(site) if s >= 0 else None for s in token_slots])
        assert (got - want).abs().max().item() < TOL * max(1.0, want.abs().max().item()), site


def test_cleared_slot_gives_base_output_and_rank_limit(tiny):
    gen = torch.Generator().manual_seed(0)
    deltas = DeltaSet(tiny.model, DeltaLimits(num_slots=2, max_lora_rank=8))
    q = "model.layers.0.self_attn.q_proj"
    linear = tiny.model.adaptable_linears()[q]
    module = _random_lora(gen, (linear.in_features, linear.out_features), 4)
    deltas.place(0, {"lora": LoraParts({q: module})})
    deltas.clear(0, {"lora": LoraParts({q: module})})
    batch = segment_batch([0, 0])
    deltas.prepare(batch)
    x = torch.randn(2, linear.in_features, generator=gen)
    assert torch.equal(linear(x, batch), torch.nn.functional.linear(x, linear.weight))
    with pytest.raises(DeltaRejected, match="exceeds --max-lora-rank"):
        deltas.place(1, {"lora": LoraParts({q: _random_lora(gen, (linear.in_features, linear.out_features), 9)})})
    with pytest.raises(DeltaRejected, match="no delta method"):
        deltas.check({"ia3": object()})


def test_gathered_rows_are_reused_only_while_nothing_changed(tiny):
    from server.deltas.lora_reference import lora_delta_reference

    gen = torch.Generator().manual_seed(3)
    deltas = DeltaSet(tiny.model, DeltaLimits(num_slots=4, max_lora_rank=8))
    q = "model.layers.1.self_attn.q_proj"
    linear = tiny.model.adaptable_linears()[q]
    shape = (linear.in_features, linear.out_features)
    modules = {slot: _random_lora(gen, shape, 4) for slot in range(4)}
    for slot, module in modules.items():
        deltas.place(slot, {"lora": LoraParts({q: module})})
    token_slots = [-1, 0, 1, 2, 3]
    x = torch.randn(len(token_slots), linear.in_features, generator=gen)
    for round_ in range(3):
        if round_ == 2:  # a new adapter in slot 2: the rows gathered before are stale
            deltas.clear(2, {"lora": LoraParts({q: modules[2]})})
            modules[2] = _random_lora(gen, shape, 8)
            deltas.place(2, {"lora": LoraParts({q: modules[2]})})
        batch = segment_batch(token_slots)
        deltas.prepare(batch)
        assert batch.method_state["lora"].reuse_gathered == (round_ == 1)
        want = torch.nn.functional.linear(x, linear.weight) + lora_delta_reference(
            x, [modules[s] if s >= 0 else None for s in token_slots])
        assert (linear(x, batch) - want).abs().max().item() < 1e-4


def test_rows_beyond_a_slots_rank_are_never_read(tiny):
    """The stacks leave rows beyond each slot's rank unwritten (here: NaN, as if a larger adapter had left them);
    grouped with higher-rank adapters, a lower-rank one is still exact."""
    from server.deltas.lora_reference import lora_delta_reference

    gen = torch.Generator().manual_seed(5)
    deltas = DeltaSet(tiny.model, DeltaLimits(num_slots=3, max_lora_rank=8))
    v = "model.layers.0.self_attn.v_proj"
    linear = tiny.model.adaptable_linears()[v]
    shape = (linear.in_features, linear.out_features)
    modules = {0: _random_lora(gen, shape, 2), 1: _random_lora(gen, shape, 8), 2: _random_lora(gen, shape, 5)}
    for slot, module in modules.items():
        deltas.place(slot, {"lora": LoraParts({v: module})})
    site = deltas.methods["lora"].sites[v]
    for slot, module in modules.items():
        site.a[slot, module.rank:] = float("nan")
        site.bt[slot, module.rank:] = float("nan")
    token_slots = [-1, 0, 1, 1, 2]
    batch = segment_batch(token_slots)
    deltas.prepare(batch)
    assert batch.method_state["lora"].groups
    x = torch.randn(len(token_slots), linear.in_features, generator=gen)
    want = torch.nn.functional.linear(x, linear.weight) + lora_delta_reference(
        x, [modules[s] if s >= 0 else None for s in token_slots])
    assert (linear(x, batch) - want).abs().max().item() < 1e-4


def test_dense_slots_are_read_in_place_and_gaps_dropped(tiny):
    """Groups whose slots fill most of the range they span read the stacks in place (no copy); a slot in that
    range without rows in the batch (here: NaN weights) is computed and dropped."""
    from server.deltas.lora_reference import lora_delta_reference

    gen = torch.Generator().manual_seed(9)
    deltas = DeltaSet(tiny.model, DeltaLimits(num_slots=5, max_lora_rank=8))
    q = "model.layers.1.self_attn.q_proj"
    linear = tiny.model.adaptable_linears()[q]
    shape = (linear.in_features, linear.out_features)
    modules = {slot: _random_lora(gen, shape, rank) for slot, rank in enumerate((3, 8, 6, 2, 5))}
    for slot, module in modules.items():
        deltas.place(slot, {"lora": LoraParts({q: module})})
    site = deltas.methods["lora"].sites[q]
    site.a[2] = float("nan")
    site.bt[2] = float("nan")
    for token_slots in ([-1, 0, 1, 1, 3, 4], [0, 1, 3, 4], [-1, 0, 4]):
        batch = segment_batch(token_slots)
        deltas.prepare(batch)
        x = torch.randn(len(token_slots), linear.in_features, generator=gen)
        want = torch.nn.functional.linear(x, linear.weight) + lora_delta_reference(
            x, [modules[s] if s >= 0 else None for s in token_slots])
        assert (linear(x, batch) - want).abs().max().item() < 1e-4, token_slots
        in_place = site.gathered[0].slot_range is not None
        assert in_place == (token_slots != [-1, 0, 4]), token_slots   # 0 and 4 alone fill 2/5 of their range
