"""Launch helpers shared by the Triton kernels."""

from __future__ import annotations

import contextlib
import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from loraprune.ops._dispatch import triton_interpreter
from loraprune.ops.quantized_weight import INT8_INVERSE_SCALE, QuantizedWeight


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


# WEIGHT_FORMAT of the importance kernels: how W is stored (see loraprune.ops.quantized_weight).
DENSE, INT8, FOUR_BIT = 0, 1, 2
_INT8_INVERSE_SCALE: tl.constexpr = tl.constexpr(INT8_INVERSE_SCALE)


class WeightArgs(NamedTuple):
    """What the importance kernels take for ``W``: its data (the dense tensor, the int8 codes or
    the packed 4-bit bytes), its row and column strides (unused for 4-bit: row-major packing), the
    scales and code (``W``'s data stands in where the format has none), the format and blocksize."""

    data: torch.Tensor
    stride_row: int
    stride_col: int
    scales: torch.Tensor
    code: torch.Tensor
    format: int
    blocksize: int


def weight_args(weight: torch.Tensor | QuantizedWeight) -> WeightArgs:
    if not isinstance(weight, QuantizedWeight):
        return WeightArgs(weight, weight.stride(0), weight.stride(1), weight, weight, DENSE, 1)
    if weight.kind == "int8":
        data = weight.data
        return WeightArgs(data, data.stride(0), data.stride(1), weight.scales, weight.scales, INT8, 1)
    in_features = weight.shape[1]
    return WeightArgs(weight.data, in_features, 1, weight.scales, weight.code, FOUR_BIT, weight.blocksize)


@triton.jit
def load_weight_tile(
    w_ptr, scale_ptr, code_ptr, rows, cols, row_ok, mask, K, stride_wn, stride_wk,
    WEIGHT_FORMAT: tl.constexpr, BLOCKSIZE: tl.constexpr,
):  # fmt: skip
    """The float32 tile ``W[rows][:, cols]`` (``rows`` int64), dequantized as it is loaded; zero
    outside ``mask`` (``row_ok``: its rows inside W). int8: code · row absmax / 127; 4-bit: the nibble of element ``i·K + j`` (high
    first), looked up in the 16-entry code, times its block's absmax."""
    if WEIGHT_FORMAT == 2:
        elements = rows[:, None] * K + cols[None, :]
        packed = tl.load(w_ptr + elements // 2, mask=mask, other=0).to(tl.int32)
        nibbles = tl.where(elements % 2 == 0, packed >> 4, packed & 15)
        absmax = tl.load(scale_ptr + elements // BLOCKSIZE, mask=mask, other=0.0)
        return tl.load(code_ptr + nibbles) * absmax
    elif WEIGHT_FORMAT == 1:
        codes = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :] * stride_wk, mask=mask, other=0)
        scales = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
        return codes.to(tl.float32) * scales[:, None] * _INT8_INVERSE_SCALE
    else:
        tile = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :] * stride_wk, mask=mask, other=0.0)
        return tile.to(tl.float32)
