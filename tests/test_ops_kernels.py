"""The CUDA kernels' index arithmetic, checked on the CPU: csrc/kernel_math_check.cu includes
csrc/latent_kernels.cu and runs the kernels' per-element functions on the host against a plain loop.
Needs nvcc (not a GPU); skipped without it. The kernels themselves run in tests/test_ops_gpu.py."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidate = os.path.join(home, "bin", "nvcc")
    return candidate if os.path.exists(candidate) else shutil.which("nvcc")


@pytest.mark.skipif(_nvcc() is None, reason="needs nvcc")
def test_kernel_index_math_on_host(tmp_path):
    exe = tmp_path / "kernel_math_check"
    build = subprocess.run(
        [_nvcc(), "-std=c++17", f"-I{CSRC}", "-o", str(exe), str(CSRC / "kernel_math_check.cu")],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stdout + run.stderr
