"""Every Triton kernel compiles to a cubin for sm_90 (H100/H200) without a GPU (see tests/kernel_compile.py; other
targets by hand: `python -m tests.kernel_compile 80`): in a subprocess, since the other kernel tests interpret."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)   # a real compile, not a cache hit
    done = subprocess.run([sys.executable, "-m", "tests.kernel_compile", "90"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 8 and all("cubin" in line and not line.endswith(" 0 bytes") for line in lines), lines
