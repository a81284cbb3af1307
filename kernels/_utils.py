"""Launch helpers shared by the Triton kernels."""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton

from loraprune.ops._dispatch import triton_interpreter


def tuning_configs(
    gpu_configs: list[triton.Config], interpreter_config: triton.Config
) -> list[triton.Config]:
    """The autotuning candidates: the interpreter gets one config, since benchmarking interpreted
    kernels would take minutes and the autotuner skips benchmarking when there is a single one."""
    return [interpreter_config] if triton_interpreter() else gpu_configs


def m_bucket(num_rows: int) -> int:
    """Autotune key for the token count: its power-of-two bucket, so that every new sequence length
    does not trigger a fresh (stalling) benchmark."""
    return min(triton.next_power_of_2(max(num_rows, 16)), 8192)


def padded_rank(rank: int, cap: int | None = None) -> int:
    """Rank block for ``tl.dot``: a power of two >= 16 (its minimum K), at most ``cap``."""
    block = max(triton.next_power_of_2(rank), 16)
    return block if cap is None else min(block, cap)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: float32 operands follow PyTorch's matmul TF32 policy, with
    3xTF32 (close to float32, much faster than IEEE) standing in for full precision; 16-bit
    operands ignore it."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "tf32x3"
    return "tf32"


@functools.cache
def num_programs_target(device: torch.device) -> int:
    """How many programs keep the device busy: two per SM (one per core for the interpreter)."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return os.cpu_count() or 1


def target_major(device: torch.device) -> int:
    """The major compute capability Triton compiles for on ``device``: its target's (the GPU's, or
    the compile-only target of ``tests/triton_compile_only.py``); 9 for the interpreter."""
    if triton_interpreter():
        return 9
    with device_guard(device):
        return triton.runtime.driver.active.get_current_target().arch // 10


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
