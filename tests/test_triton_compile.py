"""Every Triton kernel compiles for Hopper within its shared memory, without a GPU.

The interpreter runs code that the GPU compiler rejects and knows no shared-memory limit, so the
CPU tests alone would let a kernel that cannot launch on the device pass. This runs
``tests/triton_compile_only.py`` (the real launchers, every autotuning config compiled for sm_90
and never launched) in a fresh interpreter without ``TRITON_INTERPRET``; and its ``--load-check``
on the masked LoRA linear at rank 8 for sm_80 (``.ci/triton_compile_report.sh`` runs it for sm_80
and sm_90 at ranks 8, 16, 32 and 64).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

SCRIPT = Path(__file__).with_name("triton_compile_only.py")


def run_compile_only(*args: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=1200
    )


@pytest.mark.slow
@pytest.mark.skipif(
    torch.cuda.is_available(), reason="on a GPU the kernel tests compile and launch every kernel themselves"
)
def test_triton_kernels_compile_for_sm90_within_shared_memory():
    result = run_compile_only("--quick", "--arch", "90")
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    compiled = [line for line in result.stdout.splitlines() if line.startswith("ok ")]
    names = {line.split()[1] for line in compiled}
    assert names == {
        "_lora_importance_kernel",
        "_score_update_kernel",
        "_lora_down_kernel",
        "_lora_grad_kernel",
        "_masked_lora_gemm_kernel",
        "_decode_kernel",
        "_decode_split_kernel",
        "_decode_reduce_kernel",
        "_mask_plan_kernel",
        "_taylor_importance_kernel",
    }, report


@pytest.mark.slow
@pytest.mark.skipif(
    torch.cuda.is_available(), reason="on a GPU the kernel tests compile and launch every kernel themselves"
)
def test_masked_lora_linear_loads_are_vectorised_and_pipelined_at_rank_8():
    """Issue #28, item 1: at rank 8 lora_k_steps mixed H's and F's pointers (row stride 8, which
    Triton does not know to be 16-divisible) into the main loop's, and its loads of X and W became
    64 scalar 2-byte loads per thread, no cp.async; the old path's H loads were scalar too. Every
    kernel of the default fast paths, and lora_k_steps, must load through 16-byte cp.async and no
    scalar 16-bit tile load (about 45 s on a 2-core CPU, one config per kernel)."""
    result = run_compile_only("--load-check", "--arch", "80", "--ranks", "8")
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    checked = [line for line in result.stdout.splitlines() if line.startswith("ok ")]
    names = {line.split()[2] for line in checked}
    assert names == {"_lora_down_kernel", "_masked_lora_gemm_kernel", "_lora_grad_kernel", "_decode_kernel"}
    assert any("LORA_K_STEPS" in line for line in checked), report
