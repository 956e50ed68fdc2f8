"""Every Triton kernel, run by Triton's interpreter on CPU, against the torch reference (tests/kernel_cases.py):
random segment layouts, ranks 1-128 mixed in one call, empty segments, base rows, unwritten stack rows (NaN),
fp32 and bf16, within the bounds of tests/kernel_tolerance.py."""

from __future__ import annotations

import os

# Before any Triton kernel is decorated, and for the rest of the process: Triton also reads it later (its first
# launch imports modules that check it). On CPU no other test runs Triton.
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from server.kernels import triton_common  # noqa: E402
from tests.kernel_cases import attention_case, bottleneck_case, lora_case  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16)
# sigmoid(x) = 1 / (1 + exp(-x)) overflows to the right limit for very negative x (numpy warns, Triton does not)
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def test_kernels_are_interpreted():
    assert triton_common.INTERPRET, "server.kernels.triton_* was imported before TRITON_INTERPRET=1 was set"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("max_len", [1, 24])   # decode-like (one row each) and prefill-like segments
def test_lora_shrink_expand(dtype, max_len):
    ratio, err = lora_case(dtype, "cpu", max_len, seed=max_len)
    assert ratio <= 1.0, (ratio, err)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bottleneck_fused(dtype):
    ratio, err = bottleneck_case(dtype, "cpu")
    assert ratio <= 1.0, (ratio, err)


@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_decode_attention(dtype):
    ratio, err = attention_case(dtype, "cpu")
    assert ratio <= 1.0, (ratio, err)


def test_autotuning_restores_what_kernels_update_in_place():
    """On a GPU every configuration runs on the same inputs: y (LoRA expand) and block_out (bottleneck) are restored
    after each trial, the shrink's output is overwritten anyway; keys are shapes and rank bounds, never adapters."""
    from server.kernels import triton_bottleneck, triton_lora

    assert triton_lora._EXPAND.tuned.restore_value == ["y_ptr"]
    assert triton_bottleneck._FUSED.tuned.restore_value == ["in2_ptr"]
    assert triton_lora._SHRINK.tuned.keys == ["in_features", "len_bucket", "rank_bound"]


def test_a_wrong_result_is_caught(monkeypatch):
    """The bounds are tight enough to see a real fault: a kernel reading one rank row too few fails."""
    from server.kernels import triton_lora

    shrink = triton_lora.lora_shrink
    monkeypatch.setattr("tests.kernel_cases.lora_shrink", lambda x, a, ranks, *rest: shrink(
        x, a, (ranks - 1).clamp_min(1), *rest))
    ratio, _ = lora_case(torch.bfloat16, "cpu", 1)
    assert ratio > 1.0
