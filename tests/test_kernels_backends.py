"""The backend seam: chosen once per device type; every backend, driven through the LoRA and bottleneck methods on
a tiny model, equals the references (Triton under its interpreter, fp32)."""

from __future__ import annotations

import os

# Before any Triton kernel is decorated, and for the rest of the process: Triton also reads it later (its first
# launch imports modules that check it). On CPU no other test runs Triton.
os.environ["TRITON_INTERPRET"] = "1"

import inspect  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from adapters_store.types import BottleneckModule, BottleneckParts, LoraModule, LoraParts  # noqa: E402
from server.deltas import bottleneck, groups, lora, prefix  # noqa: E402
from server.deltas.base import DeltaLimits  # noqa: E402
from server.deltas.bottleneck_reference import apply_bottleneck_reference  # noqa: E402
from server.deltas.deltaset import DeltaSet  # noqa: E402
from server.deltas.lora_reference import lora_delta_reference  # noqa: E402
from server.kernels import registry, triton_backend  # noqa: E402,F401  (triton: decorated while interpreting)
from server.model.loader import load_model  # noqa: E402
from tests.helpers import segment_batch  # noqa: E402

TOL = 1e-5
# sigmoid(x) = 1 / (1 + exp(-x)) overflows to the right limit for very negative x (numpy warns, Triton does not)
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
BACKENDS = ("torch_ref", "torch_grouped", "triton")


def test_backend_is_chosen_by_device_type_in_one_place(monkeypatch):
    monkeypatch.delenv(registry.ENV, raising=False)
    assert registry.backend_name("cpu") == "torch_grouped"
    assert registry.backend_name(torch.device("cuda", 1)) == "triton"
    monkeypatch.setenv(registry.ENV, "torch_ref")
    assert registry.backend_name("cuda") == "torch_ref"
    with pytest.raises(ValueError, match="unknown kernel backend"):
        registry.configure("cutlass")
    for module in (lora, bottleneck, groups, prefix):   # no method module looks at the device type
        source = inspect.getsource(module)
        assert "cuda" not in source and "device.type" not in source, module.__name__


@pytest.fixture(params=BACKENDS)
def backend(request):
    registry.configure(request.param)
    yield request.param
    registry.configure(None)


@pytest.fixture
def tiny(tiny_model_dir, cache_dir):
    return load_model(str(tiny_model_dir), cache_dir, "cpu", "float32")


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return (got - want).abs().max().item() < TOL * max(1.0, want.abs().max().item())


# decode-like singles, a padded mix, a long (prefill) segment, base rows between
TOKEN_SLOTS = [-1, 0, 1, 2, 2, 3, -1, 4] + [5] * 20 + [1]


def test_lora_through_each_backend(tiny, backend):
    gen = torch.Generator().manual_seed(2)
    deltas = DeltaSet(tiny.model, DeltaLimits(num_slots=6, max_lora_rank=64))
    assert deltas.methods["lora"].backend.name == backend
    linears = tiny.model.adaptable_linears()
    sites = sorted(linears)
    adapters: dict[int, dict[str, LoraModule]] = {}
    for slot, rank in enumerate((1, 64, 8, 3, 33, 16)):
        adapters[slot] = {s: LoraModule(a=torch.randn(rank, linears[s].in_features, generator=gen),
                                        b=torch.randn(linears[s].out_features, rank, generator=gen), scale=0.5)
                          for i, s in enumerate(sites) if (i + slot) % 3}
        deltas.place(slot, {"lora": LoraParts(adapters[slot])})
    batch = segment_batch(TOKEN_SLOTS)
    deltas.prepare(batch)
    for site in sites[:5]:
        linear = linears[site]
        x = torch.randn(len(TOKEN_SLOTS), linear.in_features, generator=gen)
        want = torch.nn.functional.linear(x, linear.weight) + lora_delta_reference(
            x, [adapters[s].get(site) if s >= 0 else None for s in TOKEN_SLOTS])
        assert _close(linear(x, batch), want), site


def test_bottleneck_through_each_backend(tiny, backend):
    gen = torch.Generator().manual_seed(4)
    hidden = tiny.model.shape.hidden_size
    deltas = DeltaSet(tiny.model, DeltaLimits(num_slots=6, max_lora_rank=8, max_bottleneck_rank=32))
    specs = [("sublayer_input", "relu", 4), ("sublayer_output", "gelu", 32), ("block_output", "tanh", 1),
             ("sublayer_input", "silu", 7), ("block_output", "gelu_new", 16), ("sublayer_output", "sigmoid", 5)]
    parts = {}
    for slot, (input_, act, rank) in enumerate(specs):
        modules = [BottleneckModule(layer=layer, site="ffn", input=input_, activation=act, scale=0.7,
                                    down=torch.randn(rank, hidden, generator=gen),
                                    down_bias=torch.randn(rank, generator=gen),
                                    up=torch.randn(hidden, rank, generator=gen),
                                    up_bias=torch.randn(hidden, generator=gen))
                   for layer in (0, 1)]
        if slot == 3:   # two modules at one place: the reference loop, beside the kernel
            modules.append(BottleneckModule(layer=0, site="ffn", input="block_output", down=modules[0].down,
                                            down_bias=None, up=modules[0].up, up_bias=None, scale=1.0,
                                            activation="relu"))
        parts[slot] = BottleneckParts(modules)
        deltas.place(slot, {"bottleneck": parts[slot]})
    batch = segment_batch(TOKEN_SLOTS)
    deltas.prepare(batch)
    seg = batch.segments
    for layer in tiny.model.model.layers:
        sub_in, sub_out, block_out = (torch.randn(len(TOKEN_SLOTS), hidden, generator=gen) for _ in range(3))
        got, want = block_out.clone(), block_out.clone()
        for hook in layer.block_hooks["ffn"]:
            hook(sub_in, sub_out, got, batch)
        apply_bottleneck_reference(sub_in, sub_out, want, [
            (seg.bounds[i], seg.bounds[i + 1], parts[slot].at(layer.index, "ffn"))
            for i, slot in enumerate(seg.slots) if slot >= 0])
        assert _close(got, want), layer.index


def test_decode_attention_through_each_backend(backend):
    """Paged decode attention with shared prefix blocks and GQA; torch_grouped also into a preallocated workspace."""
    from server.kernels.interface import DecodeVisibility
    from server.kernels.torch_ref import decode_attention_reference

    gen = torch.Generator().manual_seed(6)
    block_size, kv_heads, heads, head_dim = 4, 2, 6, 16
    k_cache, v_cache = (torch.randn(30 * block_size, kv_heads, head_dim, generator=gen) for _ in range(2))
    tables = torch.randperm(30, generator=gen)[:15].view(3, 5).to(torch.int32)   # [B, max_blocks]
    vis = DecodeVisibility(prefix_lens=torch.tensor([0, 6, 3], dtype=torch.int32),
                           own_starts=torch.tensor([0, 8, 4], dtype=torch.int32),
                           lengths=torch.tensor([17, 9, 1], dtype=torch.int32))
    q = torch.randn(3, heads, head_dim, generator=gen)
    workspace = (torch.empty(40, block_size * kv_heads * head_dim), torch.empty(40, block_size * kv_heads * head_dim))
    got = registry.get_backend(backend).decode_attention(q, k_cache, v_cache, tables, vis, block_size, 0.25,
                                                         workspace=workspace)
    want = decode_attention_reference(q, k_cache, v_cache, tables, vis, block_size, 0.25)
    assert _close(got, want)
