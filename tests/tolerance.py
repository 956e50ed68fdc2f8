"""How far two fp32 evaluations of the same arithmetic may differ, derived from the arithmetic, for tests that compare
a fast path with a reference computed by other kernels (other summation orders, fusions, memory alignment).

Unit roundoff u = 2^-24. A dot product of length n summed in two orders differs by at most 2·γ_n·Σ|a_i·b_i|
(γ_n = n·u / (1 - n·u); Higham, Accuracy and Stability of Numerical Algorithms, 3.1): `dot_bound`, exact and safe.
Over a whole forward that worst case is vacuous, so `logit_tolerance` uses the probabilistic model (Higham & Mary,
2019): each dot product's rounding error behaves like a random walk, about λ·√n·u relative to its terms, λ = 4; the
residual stream adds the L layers' errors, at most L times one layer's; relative to the logits' scale, max |logit|;
twice that for two independent fp32 evaluations. A real difference in semantics (a shifted position, a missing
scale, a wrong slot) moves logits by orders of magnitude more; the parity tests also check that each adapter moves
its logits by more than 20 tolerances, so the comparison can tell.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

U32 = 2.0**-24
LAMBDA = 4.0


def gamma(n: int) -> float:
    return n * U32 / (1 - n * U32)


def dot_bound(abs_terms: torch.Tensor, n: int) -> torch.Tensor:
    """Worst-case difference of two fp32 summation orders of dot products of length n whose Σ|a_i·b_i| (computed
    from the operands' absolute values) is `abs_terms`."""
    return 2 * gamma(n) * abs_terms


def logit_tolerance(num_layers: int, width: int, reference: torch.Tensor) -> float:
    """Max |difference| allowed between two fp32 forwards' logits: 2·λ·L·√n·u·max|reference|, n the longest dot
    product in a layer (hidden, intermediate or attended positions)."""
    return 2 * LAMBDA * num_layers * math.sqrt(width) * U32 * float(reference.abs().max())


class Shape(Protocol):
    num_layers: int
    hidden_size: int
    intermediate_size: int


def model_logit_tolerance(shape: Shape, reference: torch.Tensor, positions: int = 0) -> float:
    """`logit_tolerance` for a served model's shape (num_layers, hidden_size, intermediate_size)."""
    width = max(shape.hidden_size, shape.intermediate_size, positions)
    return logit_tolerance(shape.num_layers, width, reference)
