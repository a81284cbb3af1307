"""Every Triton kernel compiles for Hopper within its shared memory, without a GPU.

The interpreter runs code that the GPU compiler rejects and knows no shared-memory limit, so the
CPU tests alone would let a kernel that cannot launch on the device pass. This runs
``tests/triton_compile_only.py`` (the real launchers, every autotuning config compiled for sm_90
and never launched) in a fresh interpreter without ``TRITON_INTERPRET``.
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


@pytest.mark.slow
@pytest.mark.skipif(
    torch.cuda.is_available(), reason="on a GPU the kernel tests compile and launch every kernel themselves"
)
def test_triton_kernels_compile_for_sm90_within_shared_memory():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--arch", "90"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
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
        "_taylor_importance_kernel",
    }, report
