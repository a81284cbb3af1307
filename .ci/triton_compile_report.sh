#!/usr/bin/env bash
# Compile every Triton kernel variant (old and fast paths of the masked LoRA linear included) for
# sm_80 and sm_90 without a GPU, printing shared memory, registers and spills per kernel; exits 1
# when a kernel does not compile or needs more shared memory than the target has.
# 9.5 minutes for both on the shared 2-core CPU (2026-12-02, 488 kernels with the GEMM fast paths
# lora_k_steps, persistent and tma). The pytest suite covers sm_90 only.
set -euo pipefail
cd "$(dirname "$0")/.."
for arch in 80 90; do
    env -u TRITON_INTERPRET python3 tests/triton_compile_only.py --quick --arch "$arch"
done
