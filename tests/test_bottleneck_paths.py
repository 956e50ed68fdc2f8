"""Bottleneck fast paths (grouped batched products, segment loop, gathered-weight reuse) against the
module-by-module reference, at every (layer, sub-block) hook of a tiny model."""

from __future__ import annotations

import pytest
import torch

from adapters_store.types import BottleneckModule, BottleneckParts
from server.deltas.base import DeltaLimits, DeltaRejected
from server.deltas.bottleneck import BottleneckMethod
from server.deltas.bottleneck_reference import apply_bottleneck_reference
from server.deltas.deltaset import DeltaSet
from server.deltas.groups import SegmentGroups
from server.model.batch import BatchDescriptor
from server.model.llama import SUB_BLOCKS
from server.model.loader import load_model
from tests.helpers import segment_batch

TOL = 1e-5
HIDDEN = 64
# (layer, site, input, activation, rank, with biases) of each module, by slot; slot 3 has two modules at
# (0, ffn), applied in order by the reference loop; 16 is the rank limit below.
SPECS: dict[int, list[tuple[int, str, str, str, int, bool]]] = {
    0: [(0, "ffn", "sublayer_input", "relu", 4, True), (1, "ffn", "sublayer_input", "relu", 4, True)],
    1: [(0, "attn", "sublayer_output", "gelu", 8, False), (1, "ffn", "block_output", "tanh", 3, True)],
    2: [(layer, site, "block_output", "silu", 16, True) for layer in (0, 1) for site in SUB_BLOCKS],
    3: [(0, "ffn", "sublayer_input", "relu", 5, True), (0, "ffn", "block_output", "sigmoid", 2, True),
        (1, "attn", "sublayer_input", "gelu_new", 7, False)],
    4: [(0, "ffn", "sublayer_output", "identity", 1, True)],
    5: [(1, "attn", "sublayer_input", "sigmoid", 6, True), (0, "ffn", "sublayer_input", "gelu", 9, True)],
}



def _module(gen: torch.Generator, spec: tuple[int, str, str, str, int, bool]) -> BottleneckModule:
    layer, site, input_, activation, rank, biases = spec

    def bias(n: int) -> torch.Tensor | None:
        return torch.randn(n, generator=gen) if biases else None

    return BottleneckModule(layer=layer, site=site, input=input_, down=torch.randn(rank, HIDDEN, generator=gen),
                            down_bias=bias(rank), up=torch.randn(HIDDEN, rank, generator=gen) / rank ** 0.5,
                            up_bias=bias(HIDDEN), scale=float(torch.rand(1, generator=gen)) * 4,
                            activation=activation)


def _parts(gen: torch.Generator, slot: int) -> BottleneckParts:
    return BottleneckParts([_module(gen, spec) for spec in SPECS[slot]])


@pytest.fixture
def tiny(tiny_model_dir, cache_dir):
    # A fresh model per test: a DeltaSet hooks itself into the model's sub-blocks for good.
    return load_model(str(tiny_model_dir), cache_dir, "cpu", "float32")


def _deltas(tiny, gen: torch.Generator) -> tuple[DeltaSet, dict[int, BottleneckParts]]:
    assert tiny.model.shape.hidden_size == HIDDEN
    deltas = DeltaSet(tiny.model, DeltaLimits(num_slots=8, max_lora_rank=8, max_bottleneck_rank=16))
    adapters = {slot: _parts(gen, slot) for slot in SPECS}
    for slot, parts in adapters.items():
        deltas.place(slot, {"bottleneck": parts})
    return deltas, adapters


def _check_hooks(tiny, batch: BatchDescriptor, adapters: dict[int, BottleneckParts], gen: torch.Generator) -> None:
    """Every hook's in-place addition equals the reference's, on random sub-block tensors."""
    n, seg = batch.num_tokens, batch.segments
    for layer in tiny.model.model.layers:
        for site in SUB_BLOCKS:
            sub_in, sub_out, block_out = (torch.randn(n, HIDDEN, generator=gen) for _ in range(3))
            got, want = block_out.clone(), block_out.clone()
            for hook in layer.block_hooks[site]:
                hook(sub_in, sub_out, got, batch)
            apply_bottleneck_reference(sub_in, sub_out, want, [
                (seg.bounds[i], seg.bounds[i + 1], adapters[slot].at(layer.index, site))
                for i, slot in enumerate(seg.slots) if slot in adapters])
            err = (got - want).abs().max().item()
            assert err < TOL * max(1.0, want.abs().max().item()), (layer.index, site, err)


def _rows(*runs: tuple[int, int]) -> list[int]:
    return [slot for slot, count in runs for _ in range(count)]


LAYOUTS = {
    # name: (token slots, expected number of grouped segments, of looped segments, groups unpadded)
    "grouped-back-to-back": (_rows(*((s, 1) for s in range(6))), 6, 0, True),
    "grouped-padded": (_rows((-1, 1), (0, 2), (1, 1), (-1, 2), (2, 3), (3, 1), (4, 1), (5, 2)), 6, 0, False),
    "loop": (_rows((-1, 3), *((s, 20) for s in range(6))), 0, 6, False),
    "mixed": (_rows((0, 1), (1, 1), (2, 1), (-1, 4), (3, 30), (4, 1), (5, 12)), 4, 2, False),
    "single-short": (_rows((2, 3), (-1, 2)), 0, 1, False),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_paths_equal_reference(tiny, layout):
    token_slots, grouped, looped, unpadded = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(len(token_slots))
    deltas, adapters = _deltas(tiny, gen)
    batch = segment_batch(token_slots)
    deltas.prepare(batch)
    step: SegmentGroups = batch.method_state["bottleneck"]
    assert (len(step.groups), len(step.loop), step.pad_index is None and grouped > 0) == (grouped, looped, unpadded)
    _check_hooks(tiny, batch, adapters, gen)
    _check_hooks(tiny, batch, adapters, gen)  # again, on the weights gathered the first time


def test_gathered_weights_are_reused_only_while_nothing_changed(tiny):
    gen = torch.Generator().manual_seed(7)
    deltas, adapters = _deltas(tiny, gen)
    method: BottleneckMethod = deltas.methods["bottleneck"]
    site = method.sites[(0, "ffn")]
    layouts = [[-1, 0, 1, 2, 3, 4, 5]] * 3 + [[-1, 0, 2, 3, 4, 5]] * 2
    reused, gathered = [], []
    for round_, token_slots in enumerate(layouts):
        if round_ == 2:  # a new adapter in slot 2: the weights gathered before are stale
            deltas.clear(2, {"bottleneck": adapters[2]})
            adapters[2] = BottleneckParts([_module(gen, (0, "ffn", "sublayer_output", "tanh", 11, True))])
            deltas.place(2, {"bottleneck": adapters[2]})
        batch = segment_batch(token_slots)
        deltas.prepare(batch)
        reused.append(batch.method_state["bottleneck"].reuse_gathered)
        _check_hooks(tiny, batch, adapters, gen)
        gathered.append(site.gathered)
    assert reused == [False, True, False, False, True]
    assert gathered[1] is gathered[0] and gathered[2] is not gathered[1] and gathered[4] is gathered[3]


def test_cleared_slot_adds_nothing_and_rank_limit(tiny):
    gen = torch.Generator().manual_seed(1)
    deltas, adapters = _deltas(tiny, gen)
    for slot in (1, 3):
        deltas.clear(slot, {"bottleneck": adapters.pop(slot)})
    for token_slots in ([0, 1, 2, 3, 4], _rows((1, 20), (3, 20))):
        batch = segment_batch(token_slots)
        deltas.prepare(batch)
        _check_hooks(tiny, batch, adapters, gen)
    too_wide = BottleneckParts([_module(gen, (0, "ffn", "sublayer_input", "relu", 17, True))])
    with pytest.raises(DeltaRejected, match="exceeds the bottleneck rank limit 16"):
        deltas.place(1, {"bottleneck": too_wide})


def test_rows_beyond_a_slots_rank_are_never_read(tiny):
    """The stacks leave rows beyond each slot's rank unwritten (here: NaN); grouped with higher-rank adapters,
    a lower-rank one is still exact."""
    gen = torch.Generator().manual_seed(11)
    deltas, adapters = _deltas(tiny, gen)
    method: BottleneckMethod = deltas.methods["bottleneck"]
    for site in method.sites.values():
        for slot, rank in enumerate(site.ranks):
            for stack in (site.down, site.down_bias, site.up_t):
                stack[slot, rank:] = float("nan")
    batch = segment_batch([-1, 0, 1, 2, 3, 4, 5])
    deltas.prepare(batch)
    _check_hooks(tiny, batch, adapters, gen)
