"""Fused first-order Taylor importance: row and column sums of ``|(dYᵀX) ⊙ (W + s·B·A)|`` (or its square).

One GEMM over the tokens with the importance as its epilogue. A program owns a ``BLOCK_N×BLOCK_K``
tile of the out×in gradient ``dYᵀX``, accumulates it in fp32 with ``tl.dot`` over all M tokens
(K of the GEMM is M), then loads the same tile of ``W``, adds ``s·B·A`` from the rank-r factors as r rank-1 updates
in fp32 (any rank; exact like the reference, and light on registers: ``tl.dot`` there needed a
second MMA accumulator and took ptxas from 186 to 245 registers on sm_90), multiplies, takes
``|·|`` or the square and reduces the tile to its row and column sums. A quantized ``W`` (int8 or
4-bit, :class:`~loraprune.ops.QuantizedWeight`) is read packed and dequantized as its tile is
loaded (``load_weight_tile``). No out×in temporary exists; ``dYᵀX`` cannot be split over tokens because ``|·|`` does not distribute over the sum.

Reduction scheme (deterministic, no atomics): per-tile partials with plain stores, summed by two
small ``torch.sum`` calls. The partial buffers must not depend on the tile size the autotuner
picks (they are allocated before it picks), so they have one slot per ``PARTIAL_BLOCK`` rows or
columns: a tile ``ratio = BLOCK/PARTIAL_BLOCK`` slots wide writes its sum to the first slot it
covers and zeros to the others, so that every slot is written exactly once by one program.

Registers (``tests/triton_compile_only.py``, triton 3.9, 2026-12-02): every config compiled for
sm_80 and sm_90 in fp16/bf16/fp32, ranks 1, 8, 64 and none, aligned and odd shapes, 94-255
registers per thread and no spills; the rank loop holds no state, so higher ranks cost time only.
A quantized ``W`` (compiled the same way on 2026-12-02, int8 and nf4, ranks 8 and 64): int8 as
dense; the 4-bit index math spilled on the 128-wide tiles (256-304 B per thread on sm_90, 368-376 B
on sm_80) and not on the 64-wide ones, so a 4-bit ``W`` is tuned over the 64-wide tiles only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraprune.kernels._utils import (
    FOUR_BIT,
    device_guard,
    dot_precision,
    load_weight_tile,
    m_bucket,
    tuning_configs,
    weight_args,
)
from loraprune.ops.quantized_weight import QuantizedWeight

# Granularity of the partial sums; every tile size below is a multiple of it.
PARTIAL_BLOCK = 64
# Bytes of the software-pipelined dY and X tiles a config may ask for: sm_80 has 163 KB of shared
# memory per block, and the epilogue's W and factor tiles need some too. Configs above it (fp32
# operands with the larger tiles) are pruned before tuning.
PIPELINE_SHARED_BYTES = 128 * 1024


def _config(block_n: int, block_k: int, block_m: int, num_warps: int, num_stages: int) -> triton.Config:
    meta = {"BLOCK_N": block_n, "BLOCK_K": block_k, "BLOCK_M": block_m, "GROUP_N": 8}
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


# Rows that are not 16-element aligned (loaded element by element) and X/dY of different dtypes
# (both upcast to float32 in registers) make the tuned tiles spill (ptxas, sm_80/sm_90: up to
# 624 B per thread at 128x128, 640 B for float32 at 64x64x64); this one does not, in any dtype.
FALLBACK_CONFIG = _config(64, 64, 32, num_warps=4, num_stages=3)


def _pipeline_bytes(config: triton.Config, itemsize: int) -> int:
    meta = config.kwargs
    return config.num_stages * meta["BLOCK_M"] * (meta["BLOCK_N"] + meta["BLOCK_K"]) * itemsize


def _rows_aligned(
    x: torch.Tensor, grad_y: torch.Tensor, weight: torch.Tensor, weight_row_stride: int | None = None
) -> bool:
    """Whether Triton sees every row of X, dY and W start 16-element aligned (it specialises
    integers and pointers on divisibility by 16), which vectorised loads need. ``weight``: the dense
    W, or its int8 codes or packed 4-bit bytes with the row stride in elements of the matrix."""
    row_stride = weight.stride(0) if weight_row_stride is None else weight_row_stride
    sizes = (x.shape[1], grad_y.shape[1], x.stride(0), grad_y.stride(0), row_stride)
    return all(t.data_ptr() % 16 == 0 for t in (x, grad_y, weight)) and all(v % 16 == 0 for v in sizes)


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The configs that fit these inputs: no more than ``PIPELINE_SHARED_BYTES`` of pipelined
    operand tiles in the operand dtype, keeping the smallest if none does; ``FALLBACK_CONFIG``
    alone for rows that are not 16-element aligned and for X and dY of different dtypes."""
    if kwargs.get("UPCAST") or not named_args["rows_aligned"]:
        return [FALLBACK_CONFIG]
    if kwargs.get("WEIGHT_FORMAT") == FOUR_BIT:  # its index math spills on the 128-wide tiles
        configs = [c for c in configs if max(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) <= 64] or configs
    itemsize = named_args["x_ptr"].element_size()
    fitting = [c for c in configs if _pipeline_bytes(c, itemsize) <= PIPELINE_SHARED_BYTES]
    return fitting or [min(configs, key=lambda c: _pipeline_bytes(c, itemsize))]


@triton.autotune(
    configs=tuning_configs(
        [
            _config(128, 128, 64, num_warps=8, num_stages=3),
            _config(128, 128, 32, num_warps=8, num_stages=4),
            _config(128, 64, 64, num_warps=4, num_stages=4),
            _config(64, 128, 64, num_warps=4, num_stages=4),
            _config(64, 64, 64, num_warps=4, num_stages=4),  # small matrices: more programs
        ],
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_M": 16, "GROUP_N": 2}),
    ),
    # The dtypes of the tensor arguments join the key automatically; R = 0 means no LoRA.
    key=["m_bucket", "N", "K", "R", "rows_aligned"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit
def _taylor_importance_kernel(
    x_ptr, dy_ptr, w_ptr, scale_ptr, code_ptr, a_ptr, b_ptr, row_part_ptr, col_part_ptr,
    M, N, K, R, m_bucket, rows_aligned, scaling,
    stride_xm, stride_xk, stride_dym, stride_dyn, stride_wn, stride_wk,
    stride_ar, stride_ak, stride_bn, stride_br,
    HAS_LORA: tl.constexpr, SQUARED: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, WEIGHT_FORMAT: tl.constexpr, BLOCKSIZE: tl.constexpr,
    PARTIAL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_N: tl.constexpr,
):  # fmt: skip
    # Grouped program order: GROUP_N row blocks sweep the column blocks together, so that the
    # dY and X column panels they share stay in L2.
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_k = tl.cdiv(K, BLOCK_K)
    pids_per_group = GROUP_N * num_pid_k
    first_pid_n = (pid // pids_per_group) * GROUP_N
    group_size_n = min(num_pid_n - first_pid_n, GROUP_N)
    pid_n = first_pid_n + (pid % pids_per_group) % group_size_n
    pid_k = (pid % pids_per_group) // group_size_n

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    n_ok = offs_n < N
    k_ok = offs_k < K
    tokens = offs_m.to(tl.int64)
    dy_ptrs = dy_ptr + offs_n[:, None] * stride_dyn + tokens[None, :] * stride_dym  # dYᵀ tile
    x_ptrs = x_ptr + tokens[:, None] * stride_xm + offs_k[None, :] * stride_xk

    # dYᵀX over all tokens; rows/columns outside W load zeros, so their importance is exactly 0.
    grad = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        m_ok = (m0 + offs_m) < M
        dy = tl.load(dy_ptrs, mask=n_ok[:, None] & m_ok[None, :], other=0.0)
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:  # X and dY of different dtypes: both to float32, as the reference computes
            dy = dy.to(tl.float32)
            x = x.to(tl.float32)
        grad = tl.dot(dy, x, grad, input_precision=DOT_PRECISION)
        dy_ptrs += BLOCK_M * stride_dym
        x_ptrs += BLOCK_M * stride_xm

    # W' = W + s·B·A, the LoRA product accumulated onto the W tile a rank chunk at a time.
    rows = offs_n.to(tl.int64)
    merged = load_weight_tile(
        w_ptr, scale_ptr, code_ptr, rows, offs_k, n_ok, n_ok[:, None] & k_ok[None, :], K,
        stride_wn, stride_wk, WEIGHT_FORMAT, BLOCKSIZE,
    )  # fmt: skip
    if HAS_LORA:
        # Rank-1 updates in fp32 FMAs (see the module docstring for why not tl.dot).
        b_ptrs = b_ptr + rows * stride_bn
        a_ptrs = a_ptr + offs_k * stride_ak
        for _ in range(0, R):
            b = tl.load(b_ptrs, mask=n_ok, other=0.0).to(tl.float32) * scaling
            a = tl.load(a_ptrs, mask=k_ok, other=0.0).to(tl.float32)
            merged += b[:, None] * a[None, :]
            b_ptrs += stride_br
            a_ptrs += stride_ar
    element = grad * merged
    element = element * element if SQUARED else tl.abs(element)

    # Row sums into slot pid_k·SLOTS_K of the row partials (zeros into the other slots of the
    # tile), column sums likewise along N.
    SLOTS_K: tl.constexpr = BLOCK_K // PARTIAL
    SLOTS_N: tl.constexpr = BLOCK_N // PARTIAL
    slot_k = tl.arange(0, SLOTS_K)
    slots_k = pid_k * SLOTS_K + slot_k
    row_values = tl.where(slot_k[None, :] == 0, tl.sum(element, axis=1)[:, None], 0.0)
    tl.store(
        row_part_ptr + slots_k.to(tl.int64)[None, :] * N + offs_n[:, None],
        row_values,
        mask=n_ok[:, None] & (slots_k < tl.cdiv(K, PARTIAL))[None, :],
    )
    slot_n = tl.arange(0, SLOTS_N)
    slots_n = pid_n * SLOTS_N + slot_n
    col_values = tl.where(slot_n[:, None] == 0, tl.sum(element, axis=0)[None, :], 0.0)
    tl.store(
        col_part_ptr + slots_n.to(tl.int64)[:, None] * K + offs_k[None, :],
        col_values,
        mask=(slots_n < tl.cdiv(N, PARTIAL))[:, None] & k_ok[None, :],
    )


def taylor_importance(
    x: torch.Tensor,
    grad_y: torch.Tensor,
    weight: torch.Tensor | QuantizedWeight,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scaling: float,
    squared: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row sums (out,) and column sums (in,) of ``|(dYᵀX) ⊙ (W + s·B·A)|``, float32.

    Arguments as :func:`loraprune.ops.taylor_importance` (validated there); any strides. With no
    tokens the gradient is zero and so are both sums (nothing is launched).
    """
    tokens, in_features = x.shape
    out_features = weight.shape[0]
    device = weight.device
    if tokens == 0 or out_features == 0 or in_features == 0:
        return (
            torch.zeros(out_features, device=device, dtype=torch.float32),
            torch.zeros(in_features, device=device, dtype=torch.float32),
        )
    has_lora = lora_a is not None
    rank = lora_a.shape[0] if has_lora else 0
    upcast = x.dtype != grad_y.dtype
    compute_dtype = torch.float32 if upcast else x.dtype
    row_part = torch.empty(
        (triton.cdiv(in_features, PARTIAL_BLOCK), out_features), device=device, dtype=torch.float32
    )
    col_part = torch.empty(
        (triton.cdiv(out_features, PARTIAL_BLOCK), in_features), device=device, dtype=torch.float32
    )
    w = weight_args(weight)
    # Without LoRA the factor pointers are never read: x stands in for them.
    a, b = (lora_a, lora_b) if has_lora else (x, x.t())

    aligned = int(_rows_aligned(x, grad_y, w.data, w.stride_row))  # an autotuning key: see _prune_configs

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(out_features, meta["BLOCK_N"]) * triton.cdiv(in_features, meta["BLOCK_K"]),)

    with device_guard(device):
        _taylor_importance_kernel[grid](
            x, grad_y, w.data, w.scales, w.code, a, b, row_part, col_part,
            tokens, out_features, in_features, rank, m_bucket(tokens), aligned, scaling,
            x.stride(0), x.stride(1), grad_y.stride(0), grad_y.stride(1), w.stride_row, w.stride_col,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            HAS_LORA=has_lora, SQUARED=squared, UPCAST=upcast,
            DOT_PRECISION=dot_precision(compute_dtype),
            WEIGHT_FORMAT=w.format, BLOCKSIZE=w.blocksize,
            PARTIAL=PARTIAL_BLOCK,
        )  # fmt: skip
    return row_part.sum(dim=0), col_part.sum(dim=0)
