"""Hypothesis strategies shared by the fuzz tests: JSON values, tensors of any shape and dtype, mutations."""

from __future__ import annotations

import os
from typing import Any

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# Bounded for `make test` (a few seconds a test); DELTASERVE_FUZZ_EXAMPLES=5000 searches deeper on demand.
# No deadline: tests never judge speed.
FUZZ = settings(max_examples=int(os.environ.get("DELTASERVE_FUZZ_EXAMPLES", "60")), deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

json_scalars = (st.none() | st.booleans() | st.integers(-(2**40), 2**40)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=24))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int8, torch.bool)


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    shape = draw(st.lists(st.integers(0, 70), min_size=0, max_size=3))
    dtype = draw(st.sampled_from(DTYPES))
    scale = draw(st.sampled_from((0.0, 0.1, 1.0, 1e6, 1e30)))
    values = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16)))) * scale
    return values.to(dtype)


@st.composite
def config_mutations(draw: st.DrawFn, config: dict[str, Any]) -> dict[str, Any]:
    """`config` (a parsed adapter_config.json, nested dicts included) with keys replaced, dropped or added."""
    out = dict(config)
    for key in draw(st.lists(st.sampled_from(sorted(config) or [""]), max_size=3, unique=True)):
        if isinstance(out.get(key), dict) and draw(st.booleans()):
            out[key] = draw(config_mutations(out[key]))
        elif draw(st.booleans()):
            out[key] = draw(json_values)
        else:
            out.pop(key, None)
    for key, value in draw(st.dictionaries(st.text(max_size=12), json_values, max_size=2)).items():
        out[key] = value
    return out
