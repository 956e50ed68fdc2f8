"""Compiles every Triton kernel ahead of time for a CUDA target (default sm_90: H100/H200) down to a cubin, with no
GPU: Triton's bundled LLVM and ptxas. Catches what the interpreter cannot (a construct the compiler refuses, a
block shape the target cannot lay out). Run without TRITON_INTERPRET:

    .venv/bin/python -m tests.kernel_compile [capability]
"""

from __future__ import annotations

import sys
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from server.kernels import triton_attention, triton_bottleneck, triton_lora


def signature(fn: Any, pointers: dict[str, str], floats: tuple[str, ...], consts: dict[str, Any]) -> dict[str, str]:
    """Every argument: its pointer type, fp32 for `floats`, constexpr for `consts`, i32 otherwise."""
    out = {}
    for name in fn.arg_names:
        out[name] = "constexpr" if name in consts else pointers.get(name, "fp32" if name in floats else "i32")
    return out


def kernels(dt: str) -> list[tuple[str, Any, dict[str, str], tuple[str, ...], dict[str, Any]]]:
    """(name, kernel, pointer types, float scalars, constexprs) of every kernel for activations of type dt."""
    precision = "ieee" if dt == "fp32" else "tf32"
    ints = {n: "*i32" for n in ("ranks_ptr", "starts_ptr", "lens_ptr", "slots_ptr", "input_codes_ptr",
                                "act_codes_ptr", "tables_ptr", "prefix_ptr", "own_ptr", "len_ptr")}
    typed = {n: f"*{dt}" for n in ("x_ptr", "a_ptr", "bt_ptr", "y_ptr", "in0_ptr", "in1_ptr", "in2_ptr", "down_ptr",
                                   "dbias_ptr", "up_ptr", "ubias_ptr", "q_ptr", "k_ptr", "v_ptr", "out_ptr")}
    pointers = {**ints, **typed, "h_ptr": "*fp32"}
    dot = {"DOT_F32": False, "PRECISION": precision}
    return [
        ("lora_shrink", triton_lora._shrink_kernel, pointers, (), {"BLOCK_M": 16, "BLOCK_R": 32, "BLOCK_K": 64, **dot}),
        ("lora_expand", triton_lora._expand_kernel, pointers, (),
         {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_R": 16, **dot}),
        ("bottleneck", triton_bottleneck._bottleneck_kernel, pointers, (),
         {"R_PAD": 64, "BLOCK_M": 16, "BLOCK_K": 64, "BLOCK_N": 64, **dot}),
        ("decode_attention", triton_attention._decode_attention_kernel, pointers, ("scale",),
         {"BLOCK": 16, "G_PAD": 4, "D_PAD": 64}),
    ]


def compile_all(capability: int = 90) -> dict[str, int]:
    """{kernel/dtype: cubin bytes}; raises on the first kernel that does not compile."""
    target = GPUTarget("cuda", capability, 32)
    sizes = {}
    for dt in ("bf16", "fp32"):
        for name, fn, pointers, floats, consts in kernels(dt):
            src = ASTSource(fn=fn, signature=signature(fn, pointers, floats, consts), constexprs=consts)
            sizes[f"{name}/{dt}"] = len(triton.compile(src, target=target).asm["cubin"])
    return sizes


if __name__ == "__main__":
    for key, size in compile_all(int(sys.argv[1]) if len(sys.argv) > 1 else 90).items():
        print(f"{key}: cubin {size} bytes")
