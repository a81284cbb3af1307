"""Fused LoRA-guided importance: row and column sums of ``|G ⊙ (W + s·B·A)|`` (or its square).

``G = gB·A + B·gA − gB·gA = gB·(A − gA) + B·gA`` and the merged weight are formed tile by tile in
registers from the rank-r factors, so ``W`` is read exactly once and no out×in temporary exists.
A quantized ``W`` (int8 or 4-bit, :class:`~loraprune.ops.QuantizedWeight`) is read packed and
dequantized as each tile is loaded (``load_weight_tile``).

Reduction scheme: a program owns a block of rows and a contiguous range of column tiles (the
column range is split only when there are too few row blocks to fill the device). It keeps its
row sums in registers and writes one partial per (row block, column) and per (column split, row)
with plain stores; two small ``torch.sum`` calls finish the job. No atomics, so the result is
deterministic — importance drives pruning decisions, which should not flip between identical runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraprune.kernels._utils import (
    device_guard,
    dot_precision,
    load_weight_tile,
    num_programs_target,
    padded_rank,
    target_major,
    weight_args,
)
from loraprune.ops.lora_importance import TRITON_MAX_RANK
from loraprune.ops.quantized_weight import QuantizedWeight


@triton.jit
def _lora_importance_kernel(
    w_ptr, scale_ptr, code_ptr, a_ptr, b_ptr, ga_ptr, gb_ptr, row_part_ptr, col_part_ptr,
    N, K, R, scaling, tiles_per_split,
    stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_gar, stride_gak, stride_gbn, stride_gbr,
    SQUARED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    WEIGHT_FORMAT: tl.constexpr, BLOCKSIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    rows = offs_n.to(tl.int64)
    row_ok = offs_n < N
    rank_ok = offs_r < R
    # The whole (padded) rank is one block: the B-side factors of this row block are loaded once.
    # Out-of-range rows/ranks load zeros, so G (hence the importance) is exactly zero there.
    nr_mask = row_ok[:, None] & rank_ok[None, :]
    b = tl.load(b_ptr + rows[:, None] * stride_bn + offs_r[None, :] * stride_br, mask=nr_mask, other=0.0)
    gb = tl.load(gb_ptr + rows[:, None] * stride_gbn + offs_r[None, :] * stride_gbr, mask=nr_mask, other=0.0)
    b = b.to(tl.float32)
    gb = gb.to(tl.float32)

    row_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first_tile = pid_split * tiles_per_split
    last_tile = tl.minimum(first_tile + tiles_per_split, tl.cdiv(K, BLOCK_K))
    for tile in range(first_tile, last_tile):
        cols = tile * BLOCK_K + offs_k
        col_ok = cols < K
        rk_mask = rank_ok[:, None] & col_ok[None, :]
        a = tl.load(a_ptr + offs_r[:, None] * stride_ar + cols[None, :] * stride_ak, mask=rk_mask, other=0.0)
        ga = tl.load(
            ga_ptr + offs_r[:, None] * stride_gar + cols[None, :] * stride_gak, mask=rk_mask, other=0.0
        )
        a = a.to(tl.float32)
        ga = ga.to(tl.float32)
        grad = tl.dot(gb, a - ga, input_precision=DOT_PRECISION)
        grad = tl.dot(b, ga, grad, input_precision=DOT_PRECISION)
        lora = tl.dot(b, a, input_precision=DOT_PRECISION)
        w = load_weight_tile(
            w_ptr, scale_ptr, code_ptr, rows, cols, row_ok, row_ok[:, None] & col_ok[None, :], K,
            stride_wn, stride_wk, WEIGHT_FORMAT, BLOCKSIZE,
        )  # fmt: skip
        element = grad * (w + scaling * lora)
        element = element * element if SQUARED else tl.abs(element)
        row_acc += tl.sum(element, axis=1)
        tl.store(col_part_ptr + pid_n * K + cols, tl.sum(element, axis=0), mask=col_ok)
    tl.store(row_part_ptr + pid_split * N + offs_n, row_acc, mask=row_ok)


def _block_config(block_r: int, arch: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) for a rank block on a GPU of compute capability ``arch``.x.

    The B-side factor tiles stay resident and the A-side tiles are as tall as the rank, so higher
    ranks take shorter row blocks. On sm_8x the sm_90 tiles for ranks above 16 make ptxas put up to
    11 KB per thread in local memory, hence shorter row blocks there. ``python
    tests/triton_compile_only.py --arch 80|90`` reports no spills up to rank 64 on either; rank 128
    still spills on sm_90 (0.8 KB; the spill-free alternatives re-read the A side more, unmeasured).
    A quantized ``W`` (2026-12-02, int8/nf4, ranks 8 and 64): no spills on 16-aligned shapes, and on
    odd shapes spills of the order of the dense weight's (16-352 B per thread).
    """
    if block_r > TRITON_MAX_RANK:
        raise ValueError(
            f"the Triton importance kernel takes rank <= {TRITON_MAX_RANK}, got a rank block of {block_r}"
        )
    if arch >= 9:
        if block_r <= 32:
            return 64, 64, 4, 3
        return (64, 64, 8, 2) if block_r <= 64 else (32, 64, 8, 2)
    if block_r <= 16:
        return 64, 64, 4, 3
    return (16, 64, 8, 3) if block_r <= 64 else (16, 32, 8, 3)


def lora_importance(
    weight: torch.Tensor | QuantizedWeight,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    grad_a: torch.Tensor,
    grad_b: torch.Tensor,
    scaling: float,
    squared: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row sums (out,) and column sums (in,) of the LoRA-guided importance, float32.

    Arguments as :func:`loraprune.ops.lora_importance` (validated there); any strides.
    """
    num_rows, num_cols = weight.shape
    w = weight_args(weight)
    rank = lora_a.shape[0]
    block_r = padded_rank(rank)
    block_n, block_k, num_warps, num_stages = _block_config(block_r, target_major(weight.device))
    row_blocks = triton.cdiv(num_rows, block_n)
    col_tiles = triton.cdiv(num_cols, block_k)
    tiles_per_split = triton.cdiv(col_tiles, triton.cdiv(num_programs_target(weight.device), row_blocks))
    splits = triton.cdiv(col_tiles, tiles_per_split)  # every split owns at least one tile
    row_part = torch.empty((splits, num_rows), device=weight.device, dtype=torch.float32)
    col_part = torch.empty((row_blocks, num_cols), device=weight.device, dtype=torch.float32)
    with device_guard(weight.device):
        _lora_importance_kernel[(row_blocks, splits)](
            w.data, w.scales, w.code, lora_a, lora_b, grad_a, grad_b, row_part, col_part,
            num_rows, num_cols, rank, scaling, tiles_per_split,
            w.stride_row, w.stride_col, lora_a.stride(0), lora_a.stride(1),
            lora_b.stride(0), lora_b.stride(1), grad_a.stride(0), grad_a.stride(1),
            grad_b.stride(0), grad_b.stride(1),
            SQUARED=squared, DOT_PRECISION=dot_precision(torch.float32),
            WEIGHT_FORMAT=w.format, BLOCKSIZE=w.blocksize,
            BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r, num_warps=num_warps, num_stages=num_stages,
        )  # fmt: skip
    return row_part.sum(dim=0), col_part.sum(dim=0)
