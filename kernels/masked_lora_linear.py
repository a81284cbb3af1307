"""Fused masked LoRA linear: ``Y = ((X⊙m_in) Wᵀ + b + s·drop(X⊙m_in) Aᵀ Bᵀ) ⊙ m_out``.

Forward, two launches:

1. ``H = drop(X⊙m_in) Aᵀ`` (M×r), the skinny LoRA down-projection, computed once;
2. one GEMM whose fp32 accumulator starts as ``H·(s·B)ᵀ`` (the up-projection as extra K-steps)
   and then receives ``(X⊙m_in) Wᵀ``, with the bias and ``m_out`` applied in the epilogue.

Output masks are gathered, not tiled. Pruned MLP channels (gate/up rows) are scattered: at 50 %
masked almost no 64/128-wide tile of consecutive features is fully masked, so skipping whole
tiles would save nothing. Per call, on the device and without a host synchronisation, the mask
becomes a permutation ``order = argsort(~m_out, stable)`` (kept features first, ascending, then
the masked ones) and a device scalar ``num_kept`` (:func:`kept_first`). The GEMM's tile ``j``
along ``out`` covers the features ``order[j·BLOCK_P:(j+1)·BLOCK_P]`` and is one of three kinds:

- inside the kept prefix: it loads the W and B rows of its features by index (each W row is
  contiguous along K, so the loads stay coalesced and vectorised) and stores its Y columns at
  those indices: per row of Y a scatter of whole columns, uncoalesced stores (Y is written once,
  M·out elements, against M·out·in multiply-adds, so this is cheap);
- inside the masked suffix: it loads nothing and stores zeros at its indices;
- the one boundary tile: masks per column.

``num_kept`` is read inside the kernels, so the grid keeps its size for all of ``out``; without an
output mask there is no permutation and no indirection (a constexpr). Work and W/B traffic scale
with the kept features, wherever they sit.

The input mask (``m_in``: o/down projections) is applied to the loaded X tiles and is not
gathered: gathering along K would gather W's columns, which are strided, and break coalescing.

Backward (``W`` and ``b`` frozen, so no ``dW``), with ``D = dY⊙m_out``::

    G  = D B                                         (M×r, same kernel as H)
    dX = (D W + s·(G A)⊙keep/(1-p)) ⊙ m_in           (same GEMM kernel as the forward)
    dB = s·Dᵀ H                                      (skinny reduction over tokens)
    dA = s·Gᵀ drop(X⊙m_in)                           (same kernel as dB)

With an output mask, ``dX`` and ``dB`` work on the kept features only, through a compact D:

- ``G``'s kernel reads dY once, densely (vectorised loads, masked columns zeroed on the tile; G
  is memory-bound, so its few FLOPs on masked columns cost nothing), and also writes D's kept
  columns to a compact buffer in kept-first order: column ``q`` goes to slot "kept columns
  before q" (a running count plus a ``cumsum`` over the tile's mask), which is its index in
  ``order``. A warp's stores cover consecutive columns of a row, whose kept ones land on
  consecutive slots. The ``COMPACT_TAIL`` slots after the kept ones are zeroed; the rest of the
  buffer is never written nor read. Gathering dY's (strided) columns in dX's K loop instead
  would mean 2-byte scalar loads, which cannot be asynchronous copies and stall the software
  pipeline, repeated for each of the ``in/BLOCK_P`` column tiles.
- ``dX``'s K loop runs over the kept prefix only: the compact D loads contiguously and W's rows
  (contiguous along ``in``) are gathered by index, so both operands stay coalesced, vectorised
  and pipelined.
- ``dB``'s programs take blocks of ``order`` and read the compact D contiguously: kept rows are
  computed and stored at their indices, masked ones (exactly zero) are stored without any work.

The buffer costs M×out elements of the compute dtype while the backward runs (only the kept
columns and the tail are written).

On the input side ``m_in`` masks dX's columns and dA's rows, and their tiles with all features
masked (pruned heads of o_proj) skip their loops.

Dropout keeps no mask: the keep-mask is a philox hash of (seed, row, column), recomputed wherever
it is needed; the seed is a one-element device tensor drawn from torch's default generator, so
``torch.manual_seed`` reproduces it without a host synchronisation.

The public implementation is the custom op ``loraprune::masked_lora_linear`` (with its fake and
autograd registered, so it traces under ``torch.compile``); ``masked_lora_linear`` wraps it with
the autocast cast, the seed draw and the leading-shape flattening.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from loraprune.kernels._utils import (
    device_guard,
    dot_precision,
    m_bucket,
    padded_rank,
    tuning_configs,
)

# Largest rank block held in registers; larger ranks loop over blocks of this size.
MAX_RANK_BLOCK = 64
# The compact D (see the module docstring) is zero for this many slots after its kept prefix, so
# that the kernels reading it run their last tile (at most this wide) past the prefix with no mask.
COMPACT_TAIL = tl.constexpr(128)


@triton.jit
def _dropout_keep(seed_ptr, rows, cols, dropout_p):
    """Keep-mask of LoRA dropout for X's elements (rows × cols): philox keyed by the seed, with the
    column and the row as its two 32-bit counters (unique for up to 2³² rows and columns)."""
    seed = tl.load(seed_ptr)
    col_counter = (rows[:, None] * 0 + cols[None, :]).to(tl.uint32)
    row_counter = (rows[:, None] + cols[None, :] * 0).to(tl.uint32)
    zero = col_counter * 0
    bits, _, _, _ = tl.philox(seed, col_counter, row_counter, zero, zero)
    return tl.uint_to_uniform_float(bits) >= dropout_p


@triton.jit
def _keep_mask_kernel(seed_ptr, out_ptr, M, Q, dropout_p, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_q = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    keep = _dropout_keep(seed_ptr, offs_m, offs_q, dropout_p)
    inside = (offs_m < M)[:, None] & (offs_q < Q)[None, :]
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * Q + offs_q[None, :], keep.to(tl.int8), mask=inside)


# Autotune keys hold every argument that changes the best config: sizes, mask/dropout flags and
# KIND, which product of the layer a launch computes ("h"/"g": H and G; "forward"/"dx": the GEMMs;
# "da"/"db"), since one kernel serves two products with different operand layouts.
@triton.autotune(
    configs=tuning_configs(
        [
            triton.Config({"BLOCK_M": 16, "BLOCK_Q": 256}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_M": 32, "BLOCK_Q": 128}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_M": 64, "BLOCK_Q": 128}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_Q": 64}, num_warps=8, num_stages=3),
        ],
        triton.Config({"BLOCK_M": 32, "BLOCK_Q": 32}),
    ),
    key=["m_bucket", "Q", "R", "HAS_MASK", "COMPACT", "LORA_DROPOUT", "DOT_PRECISION", "KIND"],
)
@triton.jit
def _lora_down_kernel(
    l_ptr, f_ptr, mask_ptr, seed_ptr, out_ptr, lk_ptr,
    M, Q, R, m_bucket, dropout_p, keep_scale,
    stride_lm, stride_lq, stride_fr, stride_fq, stride_om, stride_or, stride_km, stride_kq,
    HAS_MASK: tl.constexpr, COMPACT: tl.constexpr, LORA_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    KIND: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
):  # fmt: skip
    """``out[M, R] = (L ⊙ mask ⊙ drop) · Fᵀ`` for ``L`` (M×Q) and ``F`` (R×Q): the skinny LoRA
    down-projection ``H = drop(X⊙m_in) Aᵀ`` and, in the backward, ``G = (dY⊙m_out) B``. With
    ``COMPACT`` the kept columns of L are also written to ``LK`` (M×Q) in kept-first order, column
    ``q`` at slot "kept columns before q" (its index in :func:`kept_first`'s order), so that L is
    read once, densely; the ``COMPACT_TAIL`` slots after the kept ones are zeroed, the rest of LK
    is left unwritten."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_q = tl.arange(0, BLOCK_Q)
    rows = offs_m.to(tl.int64)
    row_ok = offs_m < M
    rank_ok = offs_r < R
    # One program per row block writes LK, not one per rank block.
    compact_ok = offs_m < M * (tl.program_id(1) == 0).to(tl.int32)
    kept_before = tl.zeros((), dtype=tl.int32)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for q0 in range(0, Q, BLOCK_Q):
        cols = q0 + offs_q
        col_ok = cols < Q
        lhs = tl.load(
            l_ptr + rows[:, None] * stride_lm + cols[None, :] * stride_lq,
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        # Data-dependent masks act on the loaded tile, not on the load: a load mask that varies
        # along the contiguous dimension would forbid vectorised loads.
        if HAS_MASK:
            col_keep = tl.load(mask_ptr + cols, mask=col_ok, other=0) != 0
            lhs = tl.where(col_keep[None, :], lhs, 0.0)
            if COMPACT:  # per-element stores, but a warp's land on consecutive slots of a row
                kept = col_keep.to(tl.int32)
                slots = kept_before + tl.cumsum(kept, axis=0) - 1
                tl.store(
                    lk_ptr + rows[:, None] * stride_km + slots[None, :] * stride_kq,
                    lhs,
                    mask=compact_ok[:, None] & col_keep[None, :],
                )
                kept_before += tl.sum(kept, axis=0)
        if LORA_DROPOUT:
            keep = _dropout_keep(seed_ptr, offs_m, cols, dropout_p)
            lhs = tl.where(keep, (lhs.to(tl.float32) * keep_scale).to(lhs.dtype), 0.0)
        rhs = tl.load(
            f_ptr + offs_r[None, :] * stride_fr + cols[:, None] * stride_fq,
            mask=col_ok[:, None] & rank_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(lhs, rhs.to(lhs.dtype), acc, input_precision=DOT_PRECISION)
    if COMPACT:
        tail = kept_before + tl.arange(0, COMPACT_TAIL)
        tl.store(
            lk_ptr + rows[:, None] * stride_km + tail[None, :] * stride_kq,
            tl.zeros((BLOCK_M, COMPACT_TAIL), dtype=lk_ptr.dtype.element_ty),
            mask=compact_ok[:, None] & (tail < Q)[None, :],
        )
    tl.store(
        out_ptr + rows[:, None] * stride_om + offs_r[None, :] * stride_or,
        acc.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & rank_ok[None, :],
    )


def _gemm_config(block_m: int, block_p: int, block_q: int, num_warps: int, num_stages: int) -> triton.Config:
    meta = {"BLOCK_M": block_m, "BLOCK_P": block_p, "BLOCK_Q": block_q, "GROUP_M": 8}
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


# BLOCK_P <= 128 keeps dX's column tiles inside one pruned head of o_proj (head_dim 128), so that
# its input mask skips tiles; the gathered output masks do not depend on the tile width.
@triton.autotune(
    configs=tuning_configs(
        [
            _gemm_config(128, 128, 64, num_warps=8, num_stages=3),
            _gemm_config(128, 64, 64, num_warps=4, num_stages=4),
            _gemm_config(64, 128, 64, num_warps=4, num_stages=4),
            _gemm_config(64, 64, 128, num_warps=4, num_stages=3),
            _gemm_config(16, 128, 128, num_warps=4, num_stages=4),  # few tokens (generation)
        ],
        triton.Config({"BLOCK_M": 32, "BLOCK_P": 32, "BLOCK_Q": 32, "GROUP_M": 4}),
    ),
    key=[
        "m_bucket",
        "P",
        "Q",
        "R",
        "HAS_BIAS",
        "HAS_QMASK",
        "Q_GATHER",
        "HAS_PMASK",
        "P_GATHER",
        "LORA_DROPOUT",
        "DOT_PRECISION",
        "KIND",
    ],
)
@triton.jit
def _masked_lora_gemm_kernel(
    l_ptr, rt_ptr, h_ptr, f_ptr, bias_ptr, qmask_ptr, q_order_ptr, q_count_ptr,
    pmask_ptr, p_order_ptr, p_count_ptr, seed_ptr, out_ptr,
    M, P, Q, R, m_bucket, scaling, dropout_p, keep_scale,
    stride_lm, stride_lq, stride_rq, stride_rp, stride_hm, stride_hr, stride_fr, stride_fp,
    stride_om, stride_op,
    HAS_BIAS: tl.constexpr, HAS_QMASK: tl.constexpr, Q_GATHER: tl.constexpr,
    HAS_PMASK: tl.constexpr, P_GATHER: tl.constexpr, LORA_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, KIND: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """``out[M, P] = ((L⊙m_q) Rt + s·(H F)⊙drop + bias) ⊙ m_p`` for ``L`` (M×Q), ``Rt`` (Q×P),
    ``H`` (M×r), ``F`` (r×P). The forward is ``L=X, Rt=Wᵀ, H=drop(X)Aᵀ, F=Bᵀ, m_q=m_in, m_p=m_out``;
    ``dX`` is ``L=dY, Rt=W, H=G, F=A, m_q=m_out, m_p=m_in`` with the dropout on the LoRA term.

    Each mask is either applied in place (``HAS_QMASK``: zeroes L's loaded tiles; ``HAS_PMASK``:
    zeroes output columns, tiles with all columns masked skip their loops) or goes through its
    kept-first permutation: ``Q_GATHER``: the K loop runs over the kept prefix only, on an ``L``
    whose columns already are in that order (the compact D, zero for ``COMPACT_TAIL`` columns
    after the kept ones) and on Rt's rows gathered by index;
    ``P_GATHER``: column tiles are blocks of the permutation (see the module docstring)."""
    # Grouped program order: GROUP_M row blocks sweep the column blocks together, for L2 reuse.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_p = tl.cdiv(P, BLOCK_P)
    pids_per_group = GROUP_M * num_pid_p
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_size_m
    pid_p = (pid % pids_per_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    positions = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    rows = offs_m.to(tl.int64)
    row_ok = offs_m < M
    col_ok = positions < P  # the store mask: every column of the tile is written, masked ones with 0
    # cols: the output columns of the tile; col_load: those whose operands are loaded. A tile with
    # no live column (live == 0) skips both products: its loops run zero times, it stores zeros.
    live = 1
    if P_GATHER:
        cols = tl.load(p_order_ptr + positions, mask=col_ok, other=0)
        num_kept = tl.load(p_count_ptr).to(tl.int32)
        col_keep = positions < num_kept
        live = (pid_p * BLOCK_P < num_kept).to(tl.int32)
        # The gathered axis has no contiguity to lose: masked columns are not even loaded.
        col_load = col_keep
    else:
        cols = positions
        col_load = col_ok
        if HAS_PMASK:  # on the tile, not the load mask (these columns may be W's contiguous axis)
            col_keep = tl.load(pmask_ptr + cols, mask=col_ok, other=0) != 0
            live = tl.max(col_keep.to(tl.int32), axis=0)

    # LoRA term first, so that the dropout (per output element) acts on it alone while only one
    # accumulator is live.
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    offs_r = tl.arange(0, BLOCK_R)
    for r0 in range(0, R * live, BLOCK_R):
        ranks = r0 + offs_r
        rank_ok = ranks < R
        h = tl.load(
            h_ptr + rows[:, None] * stride_hm + ranks[None, :] * stride_hr,
            mask=row_ok[:, None] & rank_ok[None, :],
            other=0.0,
        )
        f = tl.load(
            f_ptr + ranks[:, None] * stride_fr + cols[None, :] * stride_fp,
            mask=rank_ok[:, None] & col_load[None, :],
            other=0.0,
        )
        acc = tl.dot(h, (f.to(tl.float32) * scaling).to(h.dtype), acc, input_precision=DOT_PRECISION)
    if LORA_DROPOUT:
        keep = _dropout_keep(seed_ptr, offs_m, cols, dropout_p)
        acc = tl.where(keep, acc * keep_scale, 0.0)

    q_len = Q
    if Q_GATHER:
        tl.static_assert(BLOCK_Q <= COMPACT_TAIL)
        q_len = tl.load(q_count_ptr).to(tl.int32)
    offs_q = tl.arange(0, BLOCK_Q)
    l_ptrs = l_ptr + rows[:, None] * stride_lm + offs_q[None, :] * stride_lq
    rt_ptrs = rt_ptr + offs_q[:, None] * stride_rq + cols[None, :] * stride_rp
    for q0 in range(0, q_len * live, BLOCK_Q):
        q_positions = q0 + offs_q
        q_ok = q_positions < q_len
        # L's load mask has a static bound, so that the loads stay vectorised: with Q_GATHER, L is
        # the compact D, in kept-first order and zero for COMPACT_TAIL columns past the prefix.
        lhs = tl.load(l_ptrs, mask=row_ok[:, None] & (q_positions < Q)[None, :], other=0.0)
        if HAS_QMASK:  # on the tile, not the load mask: keeps the loads vectorised
            q_keep = tl.load(qmask_ptr + q_positions, mask=q_ok, other=0) != 0
            lhs = tl.where(q_keep[None, :], lhs, 0.0)
        if Q_GATHER:  # Rt's rows by index: W's rows, contiguous along the tile's columns (coalesced)
            ks = tl.load(q_order_ptr + q_positions, mask=q_ok, other=0)
            rhs_ptrs = rt_ptr + ks[:, None] * stride_rq + cols[None, :] * stride_rp
            rhs = tl.load(rhs_ptrs, mask=q_ok[:, None] & col_load[None, :], other=0.0)
        else:
            rhs = tl.load(rt_ptrs, mask=q_ok[:, None] & col_load[None, :], other=0.0)
            rt_ptrs += BLOCK_Q * stride_rq
        l_ptrs += BLOCK_Q * stride_lq
        acc = tl.dot(lhs, rhs, acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_load, other=0.0).to(tl.float32)[None, :]
    if P_GATHER or HAS_PMASK:
        acc = tl.where(col_keep[None, :], acc, 0.0)
    # With P_GATHER the columns are scattered: each row of the tile is a scatter of whole columns.
    tl.store(
        out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_op,
        acc.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


@triton.autotune(
    configs=tuning_configs(
        [
            triton.Config({"BLOCK_P": 32, "BLOCK_M": 128}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_P": 64, "BLOCK_M": 128}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_P": 128, "BLOCK_M": 64}, num_warps=8, num_stages=3),
        ],
        triton.Config({"BLOCK_P": 32, "BLOCK_M": 32}),
    ),
    key=["m_bucket", "P", "R", "HAS_MASK", "GATHER", "LORA_DROPOUT", "DOT_PRECISION", "KIND"],
)
@triton.jit
def _lora_grad_kernel(
    l_ptr, h_ptr, mask_ptr, order_ptr, count_ptr, seed_ptr, out_ptr,
    M, P, R, m_bucket, scaling, dropout_p, keep_scale,
    stride_lm, stride_lp, stride_hm, stride_hr, stride_op, stride_or,
    HAS_MASK: tl.constexpr, GATHER: tl.constexpr, LORA_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    KIND: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """``out[P, R] = s · (L ⊙ mask ⊙ drop)ᵀ · H``, reducing over the M tokens, for ``L`` (M×P) and
    ``H`` (M×r): ``dB = s·(dY⊙m_out)ᵀ H`` (``GATHER``: L is the compact D, its columns in the
    kept-first order of ``order`` and zero for ``COMPACT_TAIL`` columns after the kept ones; each
    program takes a block of that order and stores its rows at their indices, the masked ones as
    zeros without any work) and ``dA`` (stored transposed)
    ``= s·drop(X⊙m_in)ᵀ G`` (``HAS_MASK``: masked rows zeroed, blocks with no kept row skip the
    loop). Each program owns a block of output rows, so no atomics are needed."""
    positions = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_m = tl.arange(0, BLOCK_M)
    p_ok = positions < P
    rank_ok = offs_r < R
    m_end = M
    if GATHER:
        tl.static_assert(BLOCK_P <= COMPACT_TAIL)
        p_idx = tl.load(order_ptr + positions, mask=p_ok, other=0)
        num_kept = tl.load(count_ptr).to(tl.int32)
        p_keep = positions < num_kept
        m_end = M * (tl.program_id(0) * BLOCK_P < num_kept).to(tl.int32)
    else:
        p_idx = positions
        if HAS_MASK:  # (L⊙m)ᵀH = diag(m)·LᵀH: masked rows are zeroed at the end
            p_keep = tl.load(mask_ptr + p_idx, mask=p_ok, other=0) != 0
            m_end = M * tl.max(p_keep.to(tl.int32), axis=0)
    acc = tl.zeros((BLOCK_P, BLOCK_R), dtype=tl.float32)
    for m0 in range(0, m_end, BLOCK_M):
        tokens = m0 + offs_m
        m_ok = tokens < M
        rows = tokens.to(tl.int64)
        lhs = tl.load(
            l_ptr + rows[:, None] * stride_lm + positions[None, :] * stride_lp,
            mask=m_ok[:, None] & p_ok[None, :],
            other=0.0,
        )
        if LORA_DROPOUT:
            keep = _dropout_keep(seed_ptr, tokens, p_idx, dropout_p)
            lhs = tl.where(keep, (lhs.to(tl.float32) * keep_scale).to(lhs.dtype), 0.0)
        h = tl.load(
            h_ptr + rows[:, None] * stride_hm + offs_r[None, :] * stride_hr,
            mask=m_ok[:, None] & rank_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(tl.trans(lhs), h, acc, input_precision=DOT_PRECISION)
    acc *= scaling
    if GATHER or HAS_MASK:
        acc = tl.where(p_keep[:, None], acc, 0.0)
    tl.store(
        out_ptr + p_idx[:, None] * stride_op + offs_r[None, :] * stride_or,
        acc.to(out_ptr.dtype.element_ty),
        mask=p_ok[:, None] & rank_ok[None, :],
    )


class KeptFirst(NamedTuple):
    """A keep-mask as a permutation of its axis: ``order`` (int64) lists the kept indices in
    ascending order, then the masked ones; ``count``, a 0-d int64 tensor on the same device, is the
    number kept (the kernels read it from device memory)."""

    order: torch.Tensor
    count: torch.Tensor


def kept_first(mask: torch.Tensor) -> KeptFirst:
    """The :class:`KeptFirst` permutation of a bool keep-mask, computed on its device without a host
    synchronisation: a stable sort of one byte per feature and a sum, negligible against a GEMM."""
    return KeptFirst(torch.argsort(mask.logical_not().view(torch.uint8), stable=True), mask.sum())


# A mask along one kernel axis: a bool keep-mask applied to the loaded tiles, a KeptFirst gathered
# through, or None (every index kept, no indirection).
AxisMask = torch.Tensor | KeptFirst | None


def _axis_args(mask: AxisMask, placeholder: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel arguments ``(mask, order, count)`` for ``mask``: a bool mask goes as bytes (a free
    view); the arguments a kernel does not read (its HAS_MASK / GATHER flags say which) are a
    placeholder."""
    if isinstance(mask, KeptFirst):
        return placeholder, mask.order, mask.count
    if mask is None:
        return placeholder, placeholder, placeholder
    return mask.view(torch.uint8), placeholder, placeholder


def _keep_scale(dropout_p: float) -> float:
    return 1.0 / (1.0 - dropout_p)


def _lora_down(
    lhs: torch.Tensor,
    f: torch.Tensor,
    mask: torch.Tensor | None,
    seed: torch.Tensor | None,
    dropout_p: float,
    kind: str,
    compact: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lhs ⊙ mask ⊙ drop) · Fᵀ`` (M×r) in ``lhs.dtype``, for ``lhs`` (M×Q) and ``f`` (r×Q, any
    strides), and, with ``compact``, ``lhs⊙mask`` with its kept columns in kept-first order (M×Q:
    zero for ``COMPACT_TAIL`` columns after the kept ones, then unwritten), else ``lhs`` itself."""
    num_rows, reduce_len = lhs.shape
    rank = f.shape[0]
    out = torch.empty((num_rows, rank), device=lhs.device, dtype=lhs.dtype)
    lhs_kept = torch.empty_like(lhs) if compact else lhs
    block_r = padded_rank(rank, MAX_RANK_BLOCK)

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(num_rows, meta["BLOCK_M"]), triton.cdiv(rank, block_r)

    _lora_down_kernel[grid](
        lhs, f, _axis_args(mask, lhs)[0], lhs if seed is None else seed, out, lhs_kept,
        num_rows, reduce_len, rank, m_bucket(num_rows), dropout_p, _keep_scale(dropout_p),
        lhs.stride(0), lhs.stride(1), f.stride(0), f.stride(1), out.stride(0), out.stride(1),
        lhs_kept.stride(0), lhs_kept.stride(1),
        HAS_MASK=mask is not None, COMPACT=compact,
        LORA_DROPOUT=seed is not None, DOT_PRECISION=dot_precision(lhs.dtype), KIND=kind, BLOCK_R=block_r,
    )  # fmt: skip
    return out, lhs_kept


def _lora_grad(
    lhs: torch.Tensor,
    hidden: torch.Tensor,
    out: torch.Tensor,
    scaling: float,
    mask: AxisMask,
    seed: torch.Tensor | None,
    dropout_p: float,
    kind: str,
) -> None:
    """Write ``s · (lhs ⊙ mask ⊙ drop)ᵀ · hidden`` into ``out`` (P×r, any strides: a transposed view
    writes the transpose); with a gathered mask ``lhs`` comes in kept-first order (from
    :func:`_lora_down`)."""
    num_rows, num_cols = lhs.shape
    rank = hidden.shape[1]
    block_r = padded_rank(rank, MAX_RANK_BLOCK)

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(num_cols, meta["BLOCK_P"]), triton.cdiv(rank, block_r)

    _lora_grad_kernel[grid](
        lhs, hidden, *_axis_args(mask, lhs), lhs if seed is None else seed, out,
        num_rows, num_cols, rank, m_bucket(num_rows), scaling, dropout_p, _keep_scale(dropout_p),
        lhs.stride(0), lhs.stride(1), hidden.stride(0), hidden.stride(1), out.stride(0), out.stride(1),
        HAS_MASK=isinstance(mask, torch.Tensor), GATHER=isinstance(mask, KeptFirst),
        LORA_DROPOUT=seed is not None, DOT_PRECISION=dot_precision(lhs.dtype), KIND=kind, BLOCK_R=block_r,
    )  # fmt: skip


def _masked_gemm(
    lhs: torch.Tensor,
    rt: torch.Tensor,
    hidden: torch.Tensor,
    f: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None,
    q_mask: AxisMask,
    p_mask: AxisMask,
    seed: torch.Tensor | None,
    dropout_p: float,
    kind: str,
) -> torch.Tensor:
    """``((lhs⊙q_mask) Rt + s·(hidden F)⊙drop + bias) ⊙ p_mask`` (M×P) in ``lhs.dtype``, for ``lhs``
    (M×Q), ``rt`` (Q×P), ``hidden`` (M×r) and ``f`` (r×P); ``rt`` and ``f`` may be transposed views.
    With a gathered ``q_mask``, ``lhs`` comes in kept-first order (from :func:`_lora_down`)."""
    num_rows, reduce_len = lhs.shape
    rank, num_cols = f.shape
    out = torch.empty((num_rows, num_cols), device=lhs.device, dtype=lhs.dtype)

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(num_rows, meta["BLOCK_M"]) * triton.cdiv(num_cols, meta["BLOCK_P"]),)

    _masked_lora_gemm_kernel[grid](
        lhs, rt, hidden, f, lhs if bias is None else bias, *_axis_args(q_mask, lhs), *_axis_args(p_mask, lhs),
        lhs if seed is None else seed, out,
        num_rows, num_cols, reduce_len, rank, m_bucket(num_rows), scaling, dropout_p, _keep_scale(dropout_p),
        lhs.stride(0), lhs.stride(1), rt.stride(0), rt.stride(1), hidden.stride(0), hidden.stride(1),
        f.stride(0), f.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None,
        HAS_QMASK=isinstance(q_mask, torch.Tensor), Q_GATHER=isinstance(q_mask, KeptFirst),
        HAS_PMASK=isinstance(p_mask, torch.Tensor), P_GATHER=isinstance(p_mask, KeptFirst),
        LORA_DROPOUT=seed is not None, DOT_PRECISION=dot_precision(lhs.dtype), KIND=kind,
        BLOCK_R=padded_rank(rank, MAX_RANK_BLOCK),
    )  # fmt: skip
    return out


def _contiguous(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The kernels read masks as contiguous bytes: a strided or expanded mask is copied."""
    return None if mask is None else mask.contiguous()


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Activations need a unit stride along features for coalesced loads; other strides are fine."""
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("loraprune::masked_lora_linear", mutates_args=())
def masked_lora_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    out_mask: torch.Tensor | None,
    in_mask: torch.Tensor | None,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The op on 2-D ``x`` (M×in) in ``weight.dtype``; dropout is on iff ``seed`` is given.

    Returns ``Y`` and the LoRA hidden ``H = drop(X⊙m_in) Aᵀ`` (M×r) that the backward reuses.
    """
    x = _rows_contiguous(x)
    out_mask, in_mask = _contiguous(out_mask), _contiguous(in_mask)
    if x.shape[0] == 0:  # no launch: autotuning an empty grid would keep its pick for M <= 16
        return x.new_empty((0, weight.shape[0])), x.new_empty((0, lora_a.shape[0]))
    with device_guard(x.device):
        out_kept = None if out_mask is None else kept_first(out_mask)
        hidden, _ = _lora_down(x, lora_a, in_mask, seed, dropout_p, "h")
        # Transposed views (no copies) give the GEMM its (Q×P) and (r×P) operands.
        y = _masked_gemm(
            x, weight.t(), hidden, lora_b.t(), scaling, bias, in_mask, out_kept, None, 0.0, "forward"
        )
    return y, hidden


@torch.library.custom_op("loraprune::masked_lora_linear_backward", mutates_args=())
def masked_lora_linear_backward_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    hidden: torch.Tensor,
    scaling: float,
    out_mask: torch.Tensor | None,
    in_mask: torch.Tensor | None,
    dropout_p: float,
    seed: torch.Tensor | None,
    needs_x: bool,
    needs_a: bool,
    needs_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dX, dA, dB)``; a gradient not asked for comes back as an empty placeholder."""
    grad_y = _rows_contiguous(grad_y)
    x = _rows_contiguous(x)
    out_mask, in_mask = _contiguous(out_mask), _contiguous(in_mask)
    # One placeholder per output: a custom op may not return one tensor as two of its outputs.
    grad_x, grad_a, grad_b = (grad_y.new_empty(0) for _ in range(3))
    if grad_y.shape[0] == 0:  # no tokens: no launch (see the forward), zero factor gradients
        grad_x = x.new_empty(x.shape) if needs_x else grad_x
        grad_a = torch.zeros_like(lora_a) if needs_a else grad_a
        grad_b = torch.zeros_like(lora_b) if needs_b else grad_b
        return grad_x, grad_a, grad_b
    with device_guard(grad_y.device):
        out_kept = None if out_mask is None else kept_first(out_mask)  # recomputed: cheaper than saved
        # G's kernel reads dY anyway: with an output mask it also writes the compact D (grad_d: D's
        # kept columns in kept-first order) that dB and dX read contiguously (module docstring).
        grad_d = grad_y
        if needs_x or needs_a or out_kept is not None:
            grad_hidden, grad_d = _lora_down(
                grad_y, lora_b.t(), out_mask, None, 0.0, "g", out_kept is not None
            )
        if needs_b:
            grad_b = torch.empty(lora_b.shape, device=lora_b.device, dtype=lora_b.dtype)
            _lora_grad(grad_d, hidden, grad_b, scaling, out_kept, None, 0.0, "db")
        if needs_a:
            grad_a = torch.empty(lora_a.shape, device=lora_a.device, dtype=lora_a.dtype)
            _lora_grad(x, grad_hidden, grad_a.t(), scaling, in_mask, seed, dropout_p, "da")
        if needs_x:
            grad_x = _masked_gemm(
                grad_d, weight, grad_hidden, lora_a, scaling, None, out_kept, in_mask, seed, dropout_p, "dx"
            )
    return grad_x, grad_a, grad_b


@masked_lora_linear_op.register_fake
def _(x, weight, bias, lora_a, lora_b, scaling, out_mask, in_mask, dropout_p, seed):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], lora_a.shape[0]))


@masked_lora_linear_backward_op.register_fake
def _(
    grad_y,
    x,
    weight,
    lora_a,
    lora_b,
    hidden,
    scaling,
    out_mask,
    in_mask,
    dropout_p,
    seed,
    needs_x,
    needs_a,
    needs_b,
):
    def grad_like(t: torch.Tensor, needed: bool) -> torch.Tensor:
        return t.new_empty(t.shape) if needed else grad_y.new_empty(0)

    return grad_like(x, needs_x), grad_like(lora_a, needs_a), grad_like(lora_b, needs_b)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, _bias, lora_a, lora_b, scaling, out_mask, in_mask, dropout_p, seed = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1], out_mask, in_mask, seed)
    ctx.scaling = scaling
    ctx.dropout_p = dropout_p


def _backward_rule(ctx, grad_y: torch.Tensor, _grad_hidden: torch.Tensor | None):
    x, weight, lora_a, lora_b, hidden, out_mask, in_mask, seed = ctx.saved_tensors
    needs_x, _, _, needs_a, needs_b = ctx.needs_input_grad[:5]
    grad_x, grad_a, grad_b = masked_lora_linear_backward_op(
        grad_y,
        x,
        weight,
        lora_a,
        lora_b,
        hidden,
        ctx.scaling,
        out_mask,
        in_mask,
        ctx.dropout_p,
        seed,
        needs_x,
        needs_a,
        needs_b,
    )
    return (
        grad_x if needs_x else None,
        None,
        None,
        grad_a if needs_a else None,
        grad_b if needs_b else None,
        None,
        None,
        None,
        None,
        None,
    )


masked_lora_linear_op.register_autograd(_backward_rule, setup_context=_setup_context)


def draw_dropout_seed(device: torch.device) -> torch.Tensor:
    """A dropout seed from torch's default generator for ``device``, kept on the device (no sync)."""
    return torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64)


def dropout_keep_mask(seed: torch.Tensor, num_rows: int, num_cols: int, dropout_p: float) -> torch.Tensor:
    """The (num_rows × num_cols) bool keep-mask the kernels apply to ``X⊙m_in`` for ``seed``."""
    out = torch.empty((num_rows, num_cols), device=seed.device, dtype=torch.int8)
    block = 32
    with device_guard(seed.device):
        _keep_mask_kernel[(triton.cdiv(num_rows, block), triton.cdiv(num_cols, block))](
            seed, out, num_rows, num_cols, dropout_p, BLOCK_M=block, BLOCK_Q=block
        )
    return out.bool()


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The GEMM dtype: autocast's when it is on for x's device, else the weight's."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype


def masked_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    out_mask: torch.Tensor | None,
    in_mask: torch.Tensor | None,
    dropout_p: float,
    training: bool,
) -> torch.Tensor:
    """``((X⊙m_in) Wᵀ + b + s·drop(X⊙m_in) Aᵀ Bᵀ) ⊙ m_out`` for ``x`` of any leading shape.

    Arguments as :func:`loraprune.ops.masked_lora_linear` (validated there). Differentiable in
    ``x``, ``lora_a`` and ``lora_b``; the LoRA factors keep their dtype (their tiles are cast to
    the compute dtype in the kernels), ``x`` and ``weight`` are cast to the compute dtype (a
    no-op, never a copy, when they already have it).
    """
    if torch.is_grad_enabled():
        for name, frozen in (("weight", weight), ("bias", bias)):
            if frozen is not None and frozen.requires_grad:
                raise ValueError(
                    f"{name} requires grad, but the Triton kernels compute no {name} gradient (the base "
                    f"layer is frozen): freeze it ({name}.requires_grad_(False)) or use backend='torch'"
                )
    dtype = _compute_dtype(x, weight)
    seed = draw_dropout_seed(x.device) if training and dropout_p > 0 else None
    x_2d = x.to(dtype).reshape(-1, x.shape[-1])
    y, _ = masked_lora_linear_op(
        x_2d,
        weight.to(dtype),
        bias,
        lora_a,
        lora_b,
        scaling,
        out_mask,
        in_mask,
        dropout_p if seed is not None else 0.0,
        seed,
    )
    return y.view(*x.shape[:-1], weight.shape[0])
