#!/usr/bin/env bash
# Compile every Triton kernel variant (old and fast paths of the masked LoRA linear included) for
# sm_80 and sm_90 without a GPU, printing shared memory, registers and spills per kernel; exits 1
# when a kernel does not compile or needs more shared memory than the target has. Then the load
# check of the masked LoRA linear (issue #28): on the default fast paths and lora_k_steps, forward
# and backward, bf16, ranks 8, 16, 32 and 64, every kernel must load through 16-byte cp.async
# (pipelined) with no scalar 16-bit tile load (vectorised), read from its PTX.
# 9.5 minutes for the first loop on the shared 2-core CPU (2026-12-02, 488 kernels with the GEMM
# fast paths lora_k_steps, persistent and tma); the load check 4 minutes per arch with an empty
# Triton cache (2026-12-07, 120 kernels each, one config per kernel). The pytest suite
# covers sm_90 (report) and sm_80 at rank 8 (load check) only.
set -euo pipefail
cd "$(dirname "$0")/.."
for arch in 80 90; do
    env -u TRITON_INTERPRET python3 tests/triton_compile_only.py --quick --arch "$arch"
done
for arch in 80 90; do
    env -u TRITON_INTERPRET python3 tests/triton_compile_only.py --load-check --arch "$arch" --ranks 8,16,32,64
done
