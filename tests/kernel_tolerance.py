"""How far a kernel's result may lie from the fp32 reference's, derived from the arithmetic (see tests/tolerance.py
for the fp32 model). Both evaluate the same operands (so bf16 inputs are exact on both sides); they differ in

- summation order: two fp32 orders of a length-n sum differ by at most 2·γ_n·Σ|terms| (Higham 3.1);
- rounding of intermediates: on a GPU in bf16 the kernels round the LoRA shrink output h and the bottleneck
  activations to bf16 before the second product (as Punica/vLLM do), a relative error of u_bf16 = 2^-8 each;
- the final rounding into the output dtype: each side rounds y + Δ once, so they differ by at most 2·u·|result|
  (u = 2^-24 fp32, 2^-8 bf16): one bf16 ulp of the result, which dominates every bf16 bound;
- activations (bottleneck): the kernel's erf/tanh/sigmoid differ from torch's by a few fp32 ulps, and an error in
  the pre-activation passes through at most the activation's slope (≤ 1.13 for GELU; 1.2 is used);
- softmax (attention): a score error δ changes each weight by a relative ≤ 2δ (the normaliser moves too), plus
  the exponentials' few ulps.

Every bound is elementwise and worst case (no probabilistic factor): the kernels are compared per element.
"""

from __future__ import annotations

import torch

from tests.tolerance import U32, gamma

U_BF16 = 2.0**-8


def unit_roundoff(dtype: torch.dtype) -> float:
    return {torch.float32: U32, torch.bfloat16: U_BF16}[dtype]


def rounded_result(want: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Two single roundings of (nearly) the same value into `dtype` differ by at most 2·u·|value|."""
    return 2 * unit_roundoff(dtype) * want.float().abs()


def lora_bound(x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, want: torch.Tensor,
               dtype: torch.dtype) -> torch.Tensor:
    """One segment's rows: x [n, in], a [r, in], bt [r, out]; want [n, out] the reference result."""
    terms = (x.float().abs() @ a.float().abs().t()) @ bt.float().abs()               # [n, out] Σ|x||A||B|
    intermediate = U_BF16 if dtype == torch.bfloat16 else 0.0
    rel = 2 * gamma(x.shape[1]) + 2 * gamma(a.shape[0]) + intermediate
    return rounded_result(want, dtype) + (1 + unit_roundoff(dtype)) * rel * terms


def bottleneck_bound(x: torch.Tensor, down: torch.Tensor, down_bias: torch.Tensor, up_t: torch.Tensor,
                     up_bias: torch.Tensor, act: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One segment's rows: x [n, d]; down, up_t [r, d]; down_bias [r]; up_bias [d]; act [n, r] the reference's
    activations; want [n, d] the reference result."""
    hid_terms = x.float().abs() @ down.float().abs().t() + down_bias.float().abs()     # [n, r]
    hid_err = 2 * gamma(x.shape[1] + 1) * hid_terms
    act_err = 1.2 * hid_err + 16 * U32 * (1 + hid_terms)
    if dtype == torch.bfloat16:
        act_err = act_err + U_BF16 * act.abs()
    up_abs = up_t.float().abs()
    delta_err = act_err @ up_abs + 2 * gamma(down.shape[0] + 1) * (act.abs() @ up_abs + up_bias.float().abs())
    return rounded_result(want, dtype) + (1 + unit_roundoff(dtype)) * delta_err


def attention_bound(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, want: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    """One row and query head: q [hd], keys, values [n, hd] the visible positions; want [hd]."""
    score_err = 2 * gamma(q.shape[0]) * float((keys.float().abs() @ q.float().abs()).max()) * scale
    weight_err = 2 * score_err + 2 * gamma(keys.shape[0]) + 16 * U32
    return rounded_result(want, dtype) + weight_err * float(values.float().abs().max())
