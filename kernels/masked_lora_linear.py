"""Fused masked LoRA linear: ``Y = ((X⊙m_in) Wᵀ + b + s·drop(X⊙m_in) Aᵀ Bᵀ) ⊙ m_out``.

Forward, two launches (one for decode, below):

1. ``H = drop(X⊙m_in) Aᵀ`` (M×r), the skinny LoRA down-projection, computed once; stored
   :func:`hidden_width` wide (the rank rounded up to 16, zero past r), so that its row stride and
   the bound of its loads are 16-divisible at any rank (Triton specialises only such integers)
   and every load of H is vectorised (G, the backward's, likewise);
2. one GEMM ``[X⊙m_in | H]·[W | s·B]ᵀ`` with the bias and ``m_out`` applied in the epilogue. On
   the old path the fp32 accumulator starts as ``H·(s·B)ᵀ``, a prologue loop before the K loop
   (one more memory latency per tile); with ``lora_k_steps`` the padded rank is extra K steps at
   the end of the same loop, so that its loads pipeline with the main loop's: each step selects
   L's or H's pointers (and Rt's or s·F's), so H and s·F (a padded copy in Rt's dtype and layout,
   16-divisible strides) must be as aligned as L and Rt, or the main loop loses its vectorised,
   pipelined loads (at rank 8 it did: 64 scalar 2-byte loads per thread, no cp.async; the
   compile-only report's ``--load-check`` guards it).

Output masks are gathered, not tiled. Pruned MLP channels (gate/up rows) are scattered: at 50 %
masked almost no 64/128-wide tile of consecutive features is fully masked, so skipping whole
tiles would save nothing. On the device and without a host synchronisation (per call, or once per
mask version with ``mask_cache``), the mask becomes a permutation ``order = argsort(~m_out,
stable)`` (kept features first, ascending, then the masked ones) and a device scalar ``num_kept``
(:func:`~loraprune.ops.masked_lora_linear.masked_lora_linear_plan`). The GEMM's tile ``j``
along ``out`` covers the features ``order[j·BLOCK_P:(j+1)·BLOCK_P]`` and is one of three kinds:

- inside the kept prefix: it loads the W and B rows of its features by index (each W row is
  contiguous along K, so the loads stay coalesced and vectorised) and stores its Y columns at
  those indices: per row of Y a scatter of whole columns, uncoalesced stores (Y is written once,
  M·out elements, against M·out·in multiply-adds, so this is cheap);
- inside the masked suffix: it loads nothing and stores zeros at its indices;
- the one boundary tile: masks per column.

``num_kept`` is read inside the kernels, so the grid keeps its size for all of ``out``; without an
output mask there is no permutation and no indirection (a constexpr). Work and W/B traffic scale
with the kept features, wherever they sit. An output mask given without its order (a
:class:`~loraprune.ops.masked_lora_linear.MaskPlan` without ``out_order``: what ``LoraPruneLinear``
passes on a GPU for a mask it does not know to be masked) is applied in place instead: every
feature computed, the masked ones zeroed in the epilogue (and on dY's tiles in the backward).

A layer's cached plan (``mask_cache``) lives in device buffers that :class:`CachedMaskPlan`
refreshes on every forward, in one single-program launch (:func:`_mask_plan_kernel`): it compares
the live mask with the snapshot the plan was built from and rebuilds the plan only where they
differ, so a plan is never stale, whatever wrote the mask (``.data``, numpy, DLPack and kernels
leave autograd's version counter as it was), with no host synchronisation, and CUDA graphs
capture it (the buffers keep their addresses; each replay re-checks them).

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

Dropout: the keep-mask is a philox hash of (seed, row, column); the seed is a one-element device
tensor drawn from torch's default generator, so ``torch.manual_seed`` reproduces it without a host
synchronisation. The old path draws one 10-round philox output per element and recomputes the
mask wherever it is needed (H, dA, dX); the ``dropout_bits`` path draws four per 7-round call
(:func:`_dropout_keep4`), and H's kernel stores the mask as one bit per element (M·in/8 bytes) that
dA and dX read. With dropout 0 no seed is drawn and no kernel is compiled with dropout.

Fast paths (``loraprune.ops.masked_lora_linear.FAST_PATHS``, each selectable next to the path it
replaces; on by default only ``DEFAULT_FAST_PATHS``: ``mask_cache``, ``k_tiles``, ``dropout_bits``
and ``decode``, which remove work outright; the others until a GPU run measures them faster than the
path they replace): ``mask_cache`` (the caller's cached
:class:`~loraprune.ops.masked_lora_linear.MaskPlan`, refreshed on the device: no permutation rebuilt
per call), ``k_tiles`` (the input-masked forward's K loops visit the plan's kept K tiles only),
``dropout_bits`` (above), ``decode`` (M <= 16 without dropout: :func:`_decode_kernel`, one launch
with the down-projection folded into the K loop), ``decode_split_k`` (the same at M <= 16 for
K-heavy layers whose ``cdiv(out, BLOCK_P)`` programs under-fill the device, e.g. down_proj and
o_proj: :func:`_decode_split_kernel` splits K into fp32 partials in a workspace, one program per
split also summing H's, and :func:`_decode_reduce_kernel` adds them in split order with ``s·H Bᵀ``,
the bias and the output mask: deterministic, no atomics; the split count follows from the shapes and
the device only, so the workspace keeps its shape and CUDA graphs capture it, and the K ranges are
whole granules of :data:`DECODE_SPLIT_GRANULE`, not of the autotuned BLOCK_Q, so that processes that
tuned differently agree bit for bit), and three of the GEMM itself (forward and dX, whose ``D W +
s·(G A)`` has the same ``[D | G]·[W ; s·A]`` form; dA, dB, H and G are skinny reductions without a
base term, so they have none): ``lora_k_steps`` (above; not for dX with dropout, whose keep-mask
acts on the LoRA term alone), ``persistent`` (one program per SM looping over the output tiles in
the grouped order) and ``tma`` (sm_90: L's and, where not gathered, Rt's tiles load through
``tl.make_tensor_descriptor`` descriptors; only where the operands are 16-byte aligned with rows
that do not overlap, and then in place of ``lora_k_steps``, whose per-step operand choice needs
pointers).

The public implementation is the custom op ``loraprune::masked_lora_linear`` (with its fake and
autograd registered, so it traces under ``torch.compile``); ``masked_lora_linear`` wraps it with
the autocast cast, the seed draw and the leading-shape flattening.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Collection, Iterator
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from loraprune.kernels._utils import (
    device_guard,
    dot_precision,
    m_bucket,
    padded_rank,
    target_major,
    tuning_configs,
)
from loraprune.ops.masked_lora_linear import (
    K_TILE_WIDTHS,
    MaskPlan,
    enabled_fast_paths,
    masked_lora_linear_plan,
)

# Largest rank block held in registers; larger ranks loop over blocks of this size.
MAX_RANK_BLOCK = 64
# The compact D (see the module docstring) is zero for this many slots after its kept prefix, so
# that the kernels reading it run their last tile (at most this wide) past the prefix with no mask.
COMPACT_TAIL = tl.constexpr(128)
# The plan's K-tile widths (loraprune.ops.masked_lora_linear.K_TILE_WIDTHS): powers of two from 16.
K_TILE_MIN_WIDTH = tl.constexpr(K_TILE_WIDTHS[0])
K_TILE_WIDTH_COUNT = tl.constexpr(len(K_TILE_WIDTHS))
assert tuple(K_TILE_WIDTHS[0] << i for i in range(len(K_TILE_WIDTHS))) == K_TILE_WIDTHS


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
def _dropout_keep4(seed_ptr, rows, col0, dropout_p, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr):
    """Keep-mask of LoRA dropout for X's tile ``rows × [col0, col0 + BLOCK_Q)`` (``col0`` a multiple
    of 4), the ``dropout_bits`` path: one 7-round philox call per 4 columns, all four outputs used
    (column ``4g + j`` takes output ``j`` of the call keyed by the group ``g`` and the row)."""
    seed = tl.load(seed_ptr)
    groups = col0 // 4 + tl.arange(0, BLOCK_Q // 4)
    group_counter = (rows[:, None] * 0 + groups[None, :]).to(tl.uint32)
    row_counter = (rows[:, None] + groups[None, :] * 0).to(tl.uint32)
    zero = group_counter * 0
    r0, r1, r2, r3 = tl.philox(seed, group_counter, row_counter, zero, zero, n_rounds=7)
    # join(join(r0, r2), join(r1, r3))[..., i, j] is r_{2i+j}: row-major flattening interleaves them.
    bits = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK_M, BLOCK_Q))
    return tl.uint_to_uniform_float(bits) >= dropout_p


@triton.jit
def _pack_keep(keep, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr):
    """A (BLOCK_M × BLOCK_Q) keep-mask as bytes (BLOCK_M × BLOCK_Q/8), column ``c`` at bit ``c % 8``."""
    grouped = tl.reshape(keep.to(tl.int32), (BLOCK_M, BLOCK_Q // 8, 8))
    return tl.sum(grouped << tl.arange(0, 8)[None, None, :], axis=2).to(tl.uint8)


@triton.jit
def _load_keep_bits(
    bits_ptr, rows, row_ok, stride_bm, col0, num_cols, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr
):
    """The stored keep-mask of X's tile ``rows × [col0, col0 + BLOCK_Q)`` (``col0`` a multiple of 8)."""
    byte_cols = col0 // 8 + tl.arange(0, BLOCK_Q // 8)
    packed = tl.load(
        bits_ptr + rows[:, None] * stride_bm + byte_cols[None, :],
        mask=row_ok[:, None] & (byte_cols < tl.cdiv(num_cols, 8))[None, :],
        other=0,
    )
    bits = (packed.to(tl.int32)[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
    return tl.reshape(bits, (BLOCK_M, BLOCK_Q)) != 0


@triton.jit
def _kept_tiles(tiles_ptr, tile_counts_ptr, Q, BLOCK_Q: tl.constexpr):
    """The kept K tiles of width BLOCK_Q in a plan (:class:`~loraprune.ops.masked_lora_linear.MaskPlan`):
    a pointer to their list and their count. The lists of the narrower widths come first."""
    offset = Q * 0
    index = Q * 0
    for i in tl.static_range(K_TILE_WIDTH_COUNT):
        if (K_TILE_MIN_WIDTH << i) < BLOCK_Q:
            offset += tl.cdiv(Q, K_TILE_MIN_WIDTH << i)
            index += 1
    return tiles_ptr + offset, tl.load(tile_counts_ptr + index)


@triton.jit
def _keep_mask_kernel(
    seed_ptr, out_ptr, M, Q, dropout_p, PHILOX4: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_q = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    if PHILOX4:
        keep = _dropout_keep4(seed_ptr, offs_m, tl.program_id(1) * BLOCK_Q, dropout_p, BLOCK_M, BLOCK_Q)
    else:
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
    key=[
        "m_bucket",
        "Q",
        "R",
        "HAS_MASK",
        "COMPACT",
        "K_TILES",
        "LORA_DROPOUT",
        "STORE_BITS",
        "DOT_PRECISION",
        "KIND",
    ],
)
@triton.jit
def _lora_down_kernel(
    l_ptr, f_ptr, mask_ptr, tiles_ptr, tile_counts_ptr, seed_ptr, out_ptr, lk_ptr, bits_ptr,
    M, Q, R, RO, m_bucket, dropout_p, keep_scale,
    stride_lm, stride_lq, stride_fr, stride_fq, stride_om, stride_or, stride_km, stride_kq, stride_bm,
    HAS_MASK: tl.constexpr, COMPACT: tl.constexpr, K_TILES: tl.constexpr, LORA_DROPOUT: tl.constexpr,
    STORE_BITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    KIND: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
):  # fmt: skip
    """``out[M, R] = (L ⊙ mask ⊙ drop) · Fᵀ`` for ``L`` (M×Q) and ``F`` (R×Q): the skinny LoRA
    down-projection ``H = drop(X⊙m_in) Aᵀ`` and, in the backward, ``G = (dY⊙m_out) B``; ``out``
    has ``RO >= R`` columns (the rank rounded up to 16), those past R written as zeros. With
    ``COMPACT`` the kept columns of L are also written to ``LK`` (M×Q) in kept-first order, column
    ``q`` at slot "kept columns before q" (its index in the kept-first order), so that L is
    read once, densely; the ``COMPACT_TAIL`` slots after the kept ones are zeroed, the rest of LK
    is left unwritten. With ``K_TILES`` the loop runs over the plan's kept K tiles only (tiles
    with every feature masked add zero). With ``STORE_BITS`` the dropout keep-mask comes from
    :func:`_dropout_keep4` and is also stored, one bit per element, for the backward; the bits of
    skipped tiles are stored as zeros (dA and dX read whole byte rows, masked features included)."""
    tl.static_assert(not (K_TILES and COMPACT))
    tl.static_assert(LORA_DROPOUT or not STORE_BITS)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_q = tl.arange(0, BLOCK_Q)
    rows = offs_m.to(tl.int64)
    row_ok = offs_m < M
    rank_ok = offs_r < R
    # One program per row block writes LK and the keep bits, not one per rank block.
    compact_ok = offs_m < M * (tl.program_id(1) == 0).to(tl.int32)
    kept_before = tl.zeros((), dtype=tl.int32)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    num_tiles = tl.cdiv(Q, BLOCK_Q)
    if K_TILES:
        tile_list, num_tiles = _kept_tiles(tiles_ptr, tile_counts_ptr, Q, BLOCK_Q)
    for tile in range(0, num_tiles):
        q0 = tl.load(tile_list + tile) * BLOCK_Q if K_TILES else tile * BLOCK_Q
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
            if STORE_BITS:
                keep = _dropout_keep4(seed_ptr, offs_m, q0, dropout_p, BLOCK_M, BLOCK_Q)
                byte_cols = q0 // 8 + tl.arange(0, BLOCK_Q // 8)
                tl.store(
                    bits_ptr + rows[:, None] * stride_bm + byte_cols[None, :],
                    _pack_keep(keep, BLOCK_M, BLOCK_Q),
                    mask=compact_ok[:, None] & (byte_cols < tl.cdiv(Q, 8))[None, :],
                )
            else:
                keep = _dropout_keep(seed_ptr, offs_m, cols, dropout_p)
            lhs = tl.where(keep, (lhs.to(tl.float32) * keep_scale).to(lhs.dtype), 0.0)
        rhs = tl.load(
            f_ptr + offs_r[None, :] * stride_fr + cols[:, None] * stride_fq,
            mask=col_ok[:, None] & rank_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(lhs, rhs.to(lhs.dtype), acc, input_precision=DOT_PRECISION)
    if K_TILES and STORE_BITS:  # the skipped tiles' bits: zeros, stored without any other work
        byte_offs = tl.arange(0, BLOCK_Q // 8)
        for tile in range(num_tiles, tl.cdiv(Q, BLOCK_Q)):
            byte_cols = tl.load(tile_list + tile) * (BLOCK_Q // 8) + byte_offs
            tl.store(
                bits_ptr + rows[:, None] * stride_bm + byte_cols[None, :],
                tl.zeros((BLOCK_M, BLOCK_Q // 8), dtype=tl.uint8),
                mask=compact_ok[:, None] & (byte_cols < tl.cdiv(Q, 8))[None, :],
            )
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
        mask=row_ok[:, None] & (offs_r < RO)[None, :],
    )


def _gemm_config(block_m: int, block_p: int, block_q: int, num_warps: int, num_stages: int) -> triton.Config:
    meta = {"BLOCK_M": block_m, "BLOCK_P": block_p, "BLOCK_Q": block_q, "GROUP_M": 8}
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


@triton.jit
def _load_rt_tile(rt_desc, q0, p0, RT_TRANSPOSED: tl.constexpr):
    """The (BLOCK_Q × BLOCK_P) tile of Rt at ``(q0, p0)`` through its TMA descriptor: a descriptor
    needs a unit last stride, so a transposed Rt (the forward's Wᵀ) is described as W and the tile
    transposed after the load."""
    return tl.trans(rt_desc.load([p0, q0])) if RT_TRANSPOSED else rt_desc.load([q0, p0])


@triton.jit
def _gemm_tile(
    tile_id, l_desc, rt_desc,
    l_ptr, rt_ptr, h_ptr, f_ptr, bias_ptr, qmask_ptr, q_order_ptr, q_count_ptr, q_tiles_ptr, q_tile_counts_ptr,
    pmask_ptr, p_order_ptr, p_count_ptr, seed_ptr, bits_ptr, out_ptr,
    M, P, Q, R, RH, scaling, dropout_p, keep_scale,
    stride_lm, stride_lq, stride_rq, stride_rp, stride_hm, stride_hr, stride_fr, stride_fp,
    stride_om, stride_op, stride_bm,
    HAS_BIAS: tl.constexpr, HAS_QMASK: tl.constexpr, Q_GATHER: tl.constexpr, Q_TILES: tl.constexpr,
    HAS_PMASK: tl.constexpr, P_GATHER: tl.constexpr, LORA_DROPOUT: tl.constexpr, KEEP_BITS: tl.constexpr,
    LORA_K_STEPS: tl.constexpr, TMA: tl.constexpr, RT_TRANSPOSED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    """One (BLOCK_M × BLOCK_P) output tile of :func:`_masked_lora_gemm_kernel`, the ``tile_id``-th in
    grouped order: GROUP_M row blocks sweep the column blocks together, for L2 reuse."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_p = tl.cdiv(P, BLOCK_P)
    pids_per_group = GROUP_M * num_pid_p
    first_pid_m = (tile_id // pids_per_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (tile_id % pids_per_group) % group_size_m
    pid_p = (tile_id % pids_per_group) // group_size_m

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

    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    if not LORA_K_STEPS:
        # LoRA term first (a prologue), so that the dropout (per output element) acts on it alone
        # while only one accumulator is live.
        offs_r = tl.arange(0, BLOCK_R)
        for r0 in range(0, R * live, BLOCK_R):
            ranks = r0 + offs_r
            rank_ok = ranks < R
            # H's columns up to RH (a multiple of 16, zeros past R): a bound along H's contiguous
            # axis that keeps its loads vectorised whatever the rank.
            h = tl.load(
                h_ptr + rows[:, None] * stride_hm + ranks[None, :] * stride_hr,
                mask=row_ok[:, None] & (ranks < RH)[None, :],
                other=0.0,
            )
            f = tl.load(
                f_ptr + ranks[:, None] * stride_fr + cols[None, :] * stride_fp,
                mask=rank_ok[:, None] & col_load[None, :],
                other=0.0,
            )
            acc = tl.dot(h, (f.to(tl.float32) * scaling).to(h.dtype), acc, input_precision=DOT_PRECISION)
        if LORA_DROPOUT:
            if KEEP_BITS:
                keep = _load_keep_bits(
                    bits_ptr, rows, row_ok, stride_bm, pid_p * BLOCK_P, P, BLOCK_M, BLOCK_P
                )
            else:
                keep = _dropout_keep(seed_ptr, offs_m, cols, dropout_p)
            acc = tl.where(keep, acc * keep_scale, 0.0)

    q_len = Q
    if Q_GATHER:
        tl.static_assert(BLOCK_Q <= COMPACT_TAIL)
        q_len = tl.load(q_count_ptr).to(tl.int32)
    offs_q = tl.arange(0, BLOCK_Q)
    if LORA_K_STEPS:
        # [L | H]·[Rt ; s·F]: the padded rank as extra BLOCK_Q-wide K steps after L's, in the same
        # loop, so that their loads pipeline with the main loop's; each step selects its operands'
        # pointers (H and F, here already s·F in the compute dtype, have L's and Rt's dtypes). H and
        # s·F come padded to RH ranks (a multiple of 16, zeros past R) with 16-divisible strides, so
        # that the mixed pointers and the rank bound keep L's and Rt's loads vectorised at any rank.
        tl.static_assert(not (LORA_DROPOUT or TMA))
        if Q_TILES:
            tile_list, num_main = _kept_tiles(q_tiles_ptr, q_tile_counts_ptr, Q, BLOCK_Q)
        else:
            num_main = tl.cdiv(q_len, BLOCK_Q)
        for step in range(0, (num_main + tl.cdiv(RH, BLOCK_Q)) * live):
            lora = step >= num_main
            # On the LoRA steps q0 = Q, past every L column; on L's steps the ranks are negative.
            if Q_TILES:
                tile = tl.load(tile_list + tl.minimum(step, tl.maximum(num_main - 1, 0)))
                q0 = tl.where(lora, Q, tile * BLOCK_Q)
            else:
                q0 = tl.where(lora, Q, step * BLOCK_Q)
            q_positions = q0 + offs_q
            q_ok = q_positions < q_len
            ranks = (step - num_main) * BLOCK_Q + offs_q
            rank_ok = (ranks >= 0) & (ranks < RH)
            lhs_ptrs = tl.where(
                lora,
                h_ptr + rows[:, None] * stride_hm + ranks[None, :] * stride_hr,
                l_ptr + rows[:, None] * stride_lm + q_positions[None, :] * stride_lq,
            )
            # L's load mask has a static bound (see below), H's the rank; each is false on the other's steps.
            lhs_k_ok = rank_ok | (q_positions < Q)
            lhs = tl.load(lhs_ptrs, mask=row_ok[:, None] & lhs_k_ok[None, :], other=0.0)
            if HAS_QMASK:  # H's columns are not features: not masked
                q_keep = tl.load(qmask_ptr + q_positions, mask=q_ok, other=0) != 0
                lhs = tl.where((q_keep | (q_positions >= Q))[None, :], lhs, 0.0)
            rt_rows = q_positions
            if Q_GATHER:
                rt_rows = tl.load(q_order_ptr + q_positions, mask=q_ok, other=0)
            rhs_ptrs = tl.where(
                lora,
                f_ptr + ranks[:, None] * stride_fr + cols[None, :] * stride_fp,
                rt_ptr + rt_rows[:, None] * stride_rq + cols[None, :] * stride_rp,
            )
            rhs_k_ok = rank_ok | q_ok
            rhs = tl.load(rhs_ptrs, mask=rhs_k_ok[:, None] & col_load[None, :], other=0.0)
            acc = tl.dot(lhs, rhs, acc, input_precision=DOT_PRECISION)
    elif Q_TILES:  # K tiles by index, from the plan's list of those holding a kept feature
        tile_list, num_tiles = _kept_tiles(q_tiles_ptr, q_tile_counts_ptr, Q, BLOCK_Q)
        for tile in range(0, num_tiles * live):
            q0 = tl.load(tile_list + tile) * BLOCK_Q
            q_positions = q0 + offs_q
            q_ok = q_positions < Q
            if TMA:
                lhs = l_desc.load([pid_m * BLOCK_M, q0])
            else:
                lhs = tl.load(
                    l_ptr + rows[:, None] * stride_lm + q_positions[None, :] * stride_lq,
                    mask=row_ok[:, None] & q_ok[None, :],
                    other=0.0,
                )
            q_keep = tl.load(qmask_ptr + q_positions, mask=q_ok, other=0) != 0
            lhs = tl.where(q_keep[None, :], lhs, 0.0)
            if TMA and not P_GATHER:  # Rt's tiles whole, where its columns are not gathered
                rhs = _load_rt_tile(rt_desc, q0, pid_p * BLOCK_P, RT_TRANSPOSED)
            else:
                rhs = tl.load(
                    rt_ptr + q_positions[:, None] * stride_rq + cols[None, :] * stride_rp,
                    mask=q_ok[:, None] & col_load[None, :],
                    other=0.0,
                )
            acc = tl.dot(lhs, rhs, acc, input_precision=DOT_PRECISION)
    else:
        l_ptrs = l_ptr + rows[:, None] * stride_lm + offs_q[None, :] * stride_lq
        rt_ptrs = rt_ptr + offs_q[:, None] * stride_rq + cols[None, :] * stride_rp
        for q0 in range(0, q_len * live, BLOCK_Q):
            q_positions = q0 + offs_q
            q_ok = q_positions < q_len
            # L's load mask has a static bound, so that the loads stay vectorised: with Q_GATHER, L is
            # the compact D, in kept-first order and zero for COMPACT_TAIL columns past the prefix.
            if TMA:  # out-of-bounds elements come back as zeros, as with the static bound
                lhs = l_desc.load([pid_m * BLOCK_M, q0])
            else:
                lhs = tl.load(l_ptrs, mask=row_ok[:, None] & (q_positions < Q)[None, :], other=0.0)
            if HAS_QMASK:  # on the tile, not the load mask: keeps the loads vectorised
                q_keep = tl.load(qmask_ptr + q_positions, mask=q_ok, other=0) != 0
                lhs = tl.where(q_keep[None, :], lhs, 0.0)
            if Q_GATHER:  # Rt's rows by index: W's rows, contiguous along the tile's columns (coalesced)
                ks = tl.load(q_order_ptr + q_positions, mask=q_ok, other=0)
                rhs_ptrs = rt_ptr + ks[:, None] * stride_rq + cols[None, :] * stride_rp
                rhs = tl.load(rhs_ptrs, mask=q_ok[:, None] & col_load[None, :], other=0.0)
            elif TMA and not P_GATHER:
                rhs = _load_rt_tile(rt_desc, q0, pid_p * BLOCK_P, RT_TRANSPOSED)
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
        "Q_TILES",
        "LORA_DROPOUT",
        "KEEP_BITS",
        "LORA_K_STEPS",
        "PERSISTENT",
        "TMA",
        "RT_TRANSPOSED",
        "DOT_PRECISION",
        "KIND",
    ],
)
@triton.jit
def _masked_lora_gemm_kernel(
    l_ptr, rt_ptr, h_ptr, f_ptr, bias_ptr, qmask_ptr, q_order_ptr, q_count_ptr, q_tiles_ptr, q_tile_counts_ptr,
    pmask_ptr, p_order_ptr, p_count_ptr, seed_ptr, bits_ptr, out_ptr,
    M, P, Q, R, RH, m_bucket, scaling, dropout_p, keep_scale,
    stride_lm, stride_lq, stride_rq, stride_rp, stride_hm, stride_hr, stride_fr, stride_fp,
    stride_om, stride_op, stride_bm,
    HAS_BIAS: tl.constexpr, HAS_QMASK: tl.constexpr, Q_GATHER: tl.constexpr, Q_TILES: tl.constexpr,
    HAS_PMASK: tl.constexpr, P_GATHER: tl.constexpr, LORA_DROPOUT: tl.constexpr, KEEP_BITS: tl.constexpr,
    LORA_K_STEPS: tl.constexpr, PERSISTENT: tl.constexpr, TMA: tl.constexpr, RT_TRANSPOSED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, KIND: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """``out[M, P] = ((L⊙m_q) Rt + s·(H F)⊙drop + bias) ⊙ m_p`` for ``L`` (M×Q), ``Rt`` (Q×P),
    ``H`` (M×RH: RH >= r columns, zeros past r), ``F`` (r×P). The forward is ``L=X, Rt=Wᵀ,
    H=drop(X)Aᵀ, F=Bᵀ, m_q=m_in, m_p=m_out``; ``dX`` is ``L=dY, Rt=W, H=G, F=A, m_q=m_out,
    m_p=m_in`` with the dropout on the LoRA term.

    Each mask is either applied in place (``HAS_QMASK``: zeroes L's loaded tiles; ``HAS_PMASK``:
    zeroes output columns, tiles with all columns masked skip their loops) or goes through its
    kept-first permutation: ``Q_GATHER``: the K loop runs over the kept prefix only, on an ``L``
    whose columns already are in that order (the compact D, zero for ``COMPACT_TAIL`` columns
    after the kept ones) and on Rt's rows gathered by index;
    ``P_GATHER``: column tiles are blocks of the permutation (see the module docstring).
    ``Q_TILES`` (with ``HAS_QMASK``): the K loop runs over the plan's kept K tiles only.
    ``KEEP_BITS``: the dropout keep-mask is read from the bits the forward stored (dX), not
    recomputed; its columns are the output columns, so they must not be gathered.

    The LoRA term is a prologue before the K loop, or with ``LORA_K_STEPS`` (no dropout on it;
    ``F`` given as ``s·F`` in L's dtype, RH rows, zeros past r) extra K steps of the same loop.
    ``PERSISTENT``: one program per SM (the launcher's grid) loops over the tiles in grouped order.
    ``TMA`` (sm_90):
    L's tiles, and Rt's where its columns are not gathered, load through tensor descriptors
    (``RT_TRANSPOSED``: Rt is a transposed view, described as its transpose)."""
    tl.static_assert(not (KEEP_BITS and P_GATHER))
    tl.static_assert(HAS_QMASK or not Q_TILES)
    l_desc = l_ptr
    rt_desc = rt_ptr
    if TMA:
        l_desc = tl.make_tensor_descriptor(l_ptr, [M, Q], [stride_lm, 1], [BLOCK_M, BLOCK_Q])
        if not (P_GATHER or Q_GATHER):
            if RT_TRANSPOSED:
                rt_desc = tl.make_tensor_descriptor(rt_ptr, [P, Q], [stride_rp, 1], [BLOCK_P, BLOCK_Q])
            else:
                rt_desc = tl.make_tensor_descriptor(rt_ptr, [Q, P], [stride_rq, 1], [BLOCK_Q, BLOCK_P])
    if PERSISTENT:
        num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(P, BLOCK_P)
        for tile_id in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            _gemm_tile(
                tile_id, l_desc, rt_desc,
                l_ptr, rt_ptr, h_ptr, f_ptr, bias_ptr, qmask_ptr, q_order_ptr, q_count_ptr, q_tiles_ptr,
                q_tile_counts_ptr, pmask_ptr, p_order_ptr, p_count_ptr, seed_ptr, bits_ptr, out_ptr,
                M, P, Q, R, RH, scaling, dropout_p, keep_scale,
                stride_lm, stride_lq, stride_rq, stride_rp, stride_hm, stride_hr, stride_fr, stride_fp,
                stride_om, stride_op, stride_bm,
                HAS_BIAS, HAS_QMASK, Q_GATHER, Q_TILES, HAS_PMASK, P_GATHER, LORA_DROPOUT, KEEP_BITS,
                LORA_K_STEPS, TMA, RT_TRANSPOSED, DOT_PRECISION, BLOCK_R, BLOCK_M, BLOCK_P, BLOCK_Q, GROUP_M,
            )  # fmt: skip
    else:  # one tile per program: the same code as before the persistent schedule
        _gemm_tile(
            tl.program_id(0), l_desc, rt_desc,
            l_ptr, rt_ptr, h_ptr, f_ptr, bias_ptr, qmask_ptr, q_order_ptr, q_count_ptr, q_tiles_ptr,
            q_tile_counts_ptr, pmask_ptr, p_order_ptr, p_count_ptr, seed_ptr, bits_ptr, out_ptr,
            M, P, Q, R, RH, scaling, dropout_p, keep_scale,
            stride_lm, stride_lq, stride_rq, stride_rp, stride_hm, stride_hr, stride_fr, stride_fp,
            stride_om, stride_op, stride_bm,
            HAS_BIAS, HAS_QMASK, Q_GATHER, Q_TILES, HAS_PMASK, P_GATHER, LORA_DROPOUT, KEEP_BITS,
            LORA_K_STEPS, TMA, RT_TRANSPOSED, DOT_PRECISION, BLOCK_R, BLOCK_M, BLOCK_P, BLOCK_Q, GROUP_M,
        )  # fmt: skip


@triton.autotune(
    configs=tuning_configs(
        [
            triton.Config({"BLOCK_P": 32, "BLOCK_M": 128}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_P": 64, "BLOCK_M": 128}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_P": 128, "BLOCK_M": 64}, num_warps=8, num_stages=3),
        ],
        triton.Config({"BLOCK_P": 32, "BLOCK_M": 32}),
    ),
    key=["m_bucket", "P", "R", "HAS_MASK", "GATHER", "LORA_DROPOUT", "KEEP_BITS", "DOT_PRECISION", "KIND"],
)
@triton.jit
def _lora_grad_kernel(
    l_ptr, h_ptr, mask_ptr, order_ptr, count_ptr, seed_ptr, bits_ptr, out_ptr,
    M, P, R, RH, m_bucket, scaling, dropout_p, keep_scale,
    stride_lm, stride_lp, stride_hm, stride_hr, stride_op, stride_or, stride_bm,
    HAS_MASK: tl.constexpr, GATHER: tl.constexpr, LORA_DROPOUT: tl.constexpr, KEEP_BITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    KIND: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """``out[P, R] = s · (L ⊙ mask ⊙ drop)ᵀ · H``, reducing over the M tokens, for ``L`` (M×P) and
    ``H`` (M×r): ``dB = s·(dY⊙m_out)ᵀ H`` (``GATHER``: L is the compact D, its columns in the
    kept-first order of ``order`` and zero for ``COMPACT_TAIL`` columns after the kept ones; each
    program takes a block of that order and stores its rows at their indices, the masked ones as
    zeros without any work) and ``dA`` (stored transposed)
    ``= s·drop(X⊙m_in)ᵀ G`` (``HAS_MASK``: masked rows zeroed, blocks with no kept row skip the
    loop). Each program owns a block of output rows, so no atomics are needed. ``KEEP_BITS``: the
    dropout keep-mask is read from the bits the forward stored (dA), not recomputed. H's loads are
    bounded by its width ``RH`` (the rank rounded up to 16, zero past R: vectorised at any rank)."""
    tl.static_assert(not (KEEP_BITS and GATHER))
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
        # L's tile loads as the dot's (positions × tokens) operand: loaded as (tokens × positions) and
        # then transposed, the variants without dropout were not pipelined (synchronous 16-byte
        # loads, no cp.async, on sm_80 and sm_90; triton_compile_only.py --load-check).
        lhs_t = tl.load(
            l_ptr + positions[:, None] * stride_lp + rows[None, :] * stride_lm,
            mask=p_ok[:, None] & m_ok[None, :],
            other=0.0,
        )
        if LORA_DROPOUT:
            if KEEP_BITS:
                col0 = tl.program_id(0) * BLOCK_P
                keep = _load_keep_bits(bits_ptr, rows, m_ok, stride_bm, col0, P, BLOCK_M, BLOCK_P)
            else:
                keep = _dropout_keep(seed_ptr, tokens, p_idx, dropout_p)
            lhs_t = tl.where(tl.trans(keep), (lhs_t.to(tl.float32) * keep_scale).to(lhs_t.dtype), 0.0)
        h = tl.load(
            h_ptr + rows[:, None] * stride_hm + offs_r[None, :] * stride_hr,
            mask=m_ok[:, None] & (offs_r < RH)[None, :],
            other=0.0,
        )
        acc = tl.dot(lhs_t, h, acc, input_precision=DOT_PRECISION)
    acc *= scaling
    if GATHER or HAS_MASK:
        acc = tl.where(p_keep[:, None], acc, 0.0)
    tl.store(
        out_ptr + p_idx[:, None] * stride_op + offs_r[None, :] * stride_or,
        acc.to(out_ptr.dtype.element_ty),
        mask=p_ok[:, None] & rank_ok[None, :],
    )


# Decode: at most DECODE_MAX_ROWS tokens, one block of rows. Narrow column tiles give enough
# programs (4096/32 = 128 on 132 SMs is the smallest LLaMA-7B case), and each program streams its
# W rows along K once; no split-K, so no atomics, no workspace and no second launch.
DECODE_MAX_ROWS = 16


@triton.autotune(
    configs=tuning_configs(
        [
            triton.Config({"BLOCK_P": 16, "BLOCK_Q": 128}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_P": 32, "BLOCK_Q": 128}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_P": 32, "BLOCK_Q": 64}, num_warps=4, num_stages=5),
            triton.Config({"BLOCK_P": 64, "BLOCK_Q": 64}, num_warps=4, num_stages=4),
        ],
        triton.Config({"BLOCK_P": 16, "BLOCK_Q": 32}),
    ),
    key=["P", "Q", "R", "HAS_BIAS", "HAS_QMASK", "HAS_PMASK", "P_GATHER", "DOT_PRECISION"],
)
@triton.jit
def _decode_kernel(
    x_ptr, w_ptr, a_ptr, b_ptr, bias_ptr, qmask_ptr, pmask_ptr, p_order_ptr, p_count_ptr, out_ptr, h_ptr,
    M, P, Q, R, RO, scaling,
    stride_xm, stride_xq, stride_wp, stride_wq, stride_ar, stride_aq, stride_bp, stride_br,
    stride_om, stride_op, stride_hm, stride_hr,
    HAS_BIAS: tl.constexpr, HAS_QMASK: tl.constexpr, HAS_PMASK: tl.constexpr, P_GATHER: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
):  # fmt: skip
    """The forward for M <= BLOCK_M tokens in one launch: each program owns BLOCK_P output columns
    and, in the same K loop over X's tiles, accumulates ``(X⊙m_in) Wᵀ`` and the LoRA
    down-projection ``H = (X⊙m_in) Aᵀ`` (recomputed per program from A, which is r/BLOCK_P of its
    W traffic and L2-resident), then adds ``s·H Bᵀ``, the bias and the output mask (``P_GATHER``:
    kept-first column tiles as in the GEMM; ``HAS_PMASK``: applied in place). Program 0 stores H
    (RO columns, zeros past R) for the backward."""
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    rows = offs_m.to(tl.int64)
    row_ok = offs_m < M
    positions = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    col_ok = positions < P
    live = 1
    if P_GATHER:
        cols = tl.load(p_order_ptr + positions, mask=col_ok, other=0)
        num_kept = tl.load(p_count_ptr).to(tl.int32)
        col_keep = positions < num_kept
        live = (pid * BLOCK_P < num_kept).to(tl.int32)
        col_load = col_keep
    else:
        cols = positions
        col_load = col_ok
        if HAS_PMASK:
            col_keep = tl.load(pmask_ptr + cols, mask=col_ok, other=0) != 0
            live = tl.max(col_keep.to(tl.int32), axis=0)
    runs = live | (pid == 0).to(tl.int32)  # program 0 computes H even when its columns are masked
    offs_r = tl.arange(0, BLOCK_R)
    rank_ok = offs_r < R
    offs_q = tl.arange(0, BLOCK_Q)
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    hidden = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for q0 in range(0, Q * runs, BLOCK_Q):
        ks = q0 + offs_q
        k_ok = ks < Q
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xq,
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        if HAS_QMASK:
            x = tl.where((tl.load(qmask_ptr + ks, mask=k_ok, other=0) != 0)[None, :], x, 0.0)
        w = tl.load(
            w_ptr + ks[:, None] * stride_wq + cols[None, :] * stride_wp,
            mask=k_ok[:, None] & col_load[None, :],
            other=0.0,
        )
        a = tl.load(
            a_ptr + ks[:, None] * stride_aq + offs_r[None, :] * stride_ar,
            mask=k_ok[:, None] & rank_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        hidden = tl.dot(x, a.to(x.dtype), hidden, input_precision=DOT_PRECISION)
    # H rounds to the compute dtype before the up-projection, as in the two-launch path.
    hidden = hidden.to(out_ptr.dtype.element_ty)
    b = tl.load(
        b_ptr + offs_r[:, None] * stride_br + cols[None, :] * stride_bp,
        mask=rank_ok[:, None] & col_load[None, :],
        other=0.0,
    )
    acc = tl.dot(hidden, (b.to(tl.float32) * scaling).to(hidden.dtype), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_load, other=0.0).to(tl.float32)[None, :]
    if P_GATHER or HAS_PMASK:
        acc = tl.where(col_keep[None, :], acc, 0.0)
    tl.store(
        out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_op,
        acc.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )
    if pid == 0:
        tl.store(
            h_ptr + rows[:, None] * stride_hm + offs_r[None, :] * stride_hr,
            hidden,
            mask=row_ok[:, None] & (offs_r < RO)[None, :],
        )


# decode_split_k: the split kernel's column block (fixed, so that the host knows its program count),
# the fewest K features worth a split (fewer and the partials' traffic outweighs the parallelism),
# the most splits, and the granule of the K ranges: each split's range is a multiple of it, fixed
# (not the autotuned BLOCK_Q), so that two processes that tuned differently sum the same ranges in
# the same order and agree bit for bit. A multiple of every BLOCK_Q the split kernel is tuned over.
DECODE_SPLIT_BLOCK_P = 32
DECODE_SPLIT_MIN_K = 256
DECODE_MAX_SPLITS = 16
DECODE_SPLIT_GRANULE = 256


@triton.jit
def _decode_x_tile(x_ptr, qmask_ptr, rows, row_ok, ks, k_ok, stride_xm, stride_xq, HAS_QMASK: tl.constexpr):
    """X's tile ``X[rows][:, ks]`` with the input mask applied (zero outside the masks)."""
    x = tl.load(
        x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xq,
        mask=row_ok[:, None] & k_ok[None, :],
        other=0.0,
    )
    if HAS_QMASK:
        x = tl.where((tl.load(qmask_ptr + ks, mask=k_ok, other=0) != 0)[None, :], x, 0.0)
    return x


@triton.autotune(
    configs=tuning_configs(
        [
            triton.Config({"BLOCK_Q": 128}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_Q": 128}, num_warps=4, num_stages=5),
            triton.Config({"BLOCK_Q": 64}, num_warps=4, num_stages=5),
            triton.Config({"BLOCK_Q": 256}, num_warps=8, num_stages=3),
        ],
        triton.Config({"BLOCK_Q": 32}),
    ),
    key=["P", "Q", "R", "SPLITS", "HAS_QMASK", "P_GATHER", "DOT_PRECISION"],
)
@triton.jit
def _decode_split_kernel(
    x_ptr, w_ptr, a_ptr, qmask_ptr, p_order_ptr, p_count_ptr, part_ptr, h_part_ptr,
    M, P, Q, R, SPLITS,
    stride_xm, stride_xq, stride_wp, stride_wq, stride_ar, stride_aq,
    HAS_QMASK: tl.constexpr, P_GATHER: tl.constexpr, DOT_PRECISION: tl.constexpr, GRANULE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
):  # fmt: skip
    """Split-K partials of the decode forward, grid ``(cdiv(P, BLOCK_P) + 1, SPLITS)``: program
    ``(j, s)`` multiplies the s-th K range of ``X⊙m_in`` by W's column tile j (kept-first with
    ``P_GATHER``; a tile past the kept prefix loads and stores nothing) into ``part[s]`` (fp32,
    SPLITS×M×P, by position in the tile order); the last program of each split computes H's
    partial ``(X⊙m_in) Aᵀ`` over the same range into ``h_part[s]`` (fp32, SPLITS×M×BLOCK_R).
    The K ranges are whole granules of GRANULE features (whole BLOCK_Q tiles), whatever config the
    autotuner picked; trailing ones may be empty (their partials are zero)."""
    tl.static_assert(GRANULE % BLOCK_Q == 0)
    pid_p = tl.program_id(0)
    split = tl.program_id(1)
    k_per_split = tl.cdiv(tl.cdiv(Q, SPLITS), GRANULE) * GRANULE
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, Q)
    offs_m = tl.arange(0, BLOCK_M)
    rows = offs_m.to(tl.int64)
    row_ok = offs_m < M
    part_rows = split.to(tl.int64) * M + rows
    offs_q = tl.arange(0, BLOCK_Q)
    if pid_p == tl.num_programs(0) - 1:
        offs_r = tl.arange(0, BLOCK_R)
        rank_ok = offs_r < R
        hidden = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for q0 in range(k_start, k_end, BLOCK_Q):
            ks = q0 + offs_q
            k_ok = ks < Q
            x = _decode_x_tile(x_ptr, qmask_ptr, rows, row_ok, ks, k_ok, stride_xm, stride_xq, HAS_QMASK)
            a = tl.load(
                a_ptr + ks[:, None] * stride_aq + offs_r[None, :] * stride_ar,
                mask=k_ok[:, None] & rank_ok[None, :],
                other=0.0,
            )
            hidden = tl.dot(x, a.to(x.dtype), hidden, input_precision=DOT_PRECISION)
        tl.store(h_part_ptr + part_rows[:, None] * BLOCK_R + offs_r[None, :], hidden, mask=row_ok[:, None])
    else:
        positions = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        k_stop = k_end
        if P_GATHER:
            cols = tl.load(p_order_ptr + positions, mask=positions < P, other=0)
            num_kept = tl.load(p_count_ptr).to(tl.int32)
            col_load = positions < num_kept
            k_stop = tl.where(pid_p * BLOCK_P < num_kept, k_end, k_start)
        else:
            cols = positions
            col_load = positions < P
        acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
        for q0 in range(k_start, k_stop, BLOCK_Q):
            ks = q0 + offs_q
            k_ok = ks < Q
            x = _decode_x_tile(x_ptr, qmask_ptr, rows, row_ok, ks, k_ok, stride_xm, stride_xq, HAS_QMASK)
            w = tl.load(
                w_ptr + ks[:, None] * stride_wq + cols[None, :] * stride_wp,
                mask=k_ok[:, None] & col_load[None, :],
                other=0.0,
            )
            acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        tl.store(
            part_ptr + part_rows[:, None] * P + positions[None, :],
            acc,
            mask=row_ok[:, None] & col_load[None, :],
        )


@triton.jit
def _decode_reduce_kernel(
    part_ptr, h_part_ptr, b_ptr, bias_ptr, pmask_ptr, p_order_ptr, p_count_ptr, out_ptr, h_ptr,
    M, P, R, RO, SPLITS, scaling,
    stride_bp, stride_br, stride_om, stride_op, stride_hm, stride_hr,
    HAS_BIAS: tl.constexpr, HAS_PMASK: tl.constexpr, P_GATHER: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """Y from :func:`_decode_split_kernel`'s partials: each program sums H's partials and its
    column tile's in split order (fixed: deterministic), then adds ``s·H Bᵀ``, the bias and the
    output mask as :func:`_decode_kernel` does. Program 0 stores H (RO columns) for the backward."""
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    rows = offs_m.to(tl.int64)
    row_ok = offs_m < M
    offs_r = tl.arange(0, BLOCK_R)
    rank_ok = offs_r < R
    hidden = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for split in range(0, SPLITS):
        part_rows = split * M + rows
        hidden += tl.load(
            h_part_ptr + part_rows[:, None] * BLOCK_R + offs_r[None, :], mask=row_ok[:, None], other=0.0
        )
    # H rounds to the compute dtype before the up-projection, as in the two-launch path.
    hidden = hidden.to(out_ptr.dtype.element_ty)
    positions = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    col_ok = positions < P
    if P_GATHER:
        cols = tl.load(p_order_ptr + positions, mask=col_ok, other=0)
        col_load = positions < tl.load(p_count_ptr).to(tl.int32)
    else:
        cols = positions
        col_load = col_ok
    col_keep = col_load
    if HAS_PMASK:
        col_keep = col_ok & (tl.load(pmask_ptr + cols, mask=col_ok, other=0) != 0)
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for split in range(0, SPLITS):
        part_rows = split * M + rows
        acc += tl.load(
            part_ptr + part_rows[:, None] * P + positions[None, :],
            mask=row_ok[:, None] & col_load[None, :],
            other=0.0,
        )
    b = tl.load(
        b_ptr + offs_r[:, None] * stride_br + cols[None, :] * stride_bp,
        mask=rank_ok[:, None] & col_load[None, :],
        other=0.0,
    )
    acc = tl.dot(hidden, (b.to(tl.float32) * scaling).to(hidden.dtype), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_load, other=0.0).to(tl.float32)[None, :]
    if P_GATHER or HAS_PMASK:
        acc = tl.where(col_keep[None, :], acc, 0.0)
    tl.store(
        out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_op,
        acc.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )
    if pid == 0:
        tl.store(
            h_ptr + rows[:, None] * stride_hm + offs_r[None, :] * stride_hr,
            hidden,
            mask=row_ok[:, None] & (offs_r < RO)[None, :],
        )


# The mask plan cache (LoraPruneLinear, mask_cache): one program refreshes a mask's plan in place,
# comparing the mask with its snapshot this many features at a time (3 loads each for 11008).
MASK_PLAN_BLOCK = 4096


@triton.jit
def _kept_first_tiles(mask_ptr, tiles_ptr, N, WIDTH: tl.constexpr, TILE_BLOCK: tl.constexpr):
    """Write the indices of the WIDTH-wide tiles of the mask (N bytes) that hold a kept feature,
    ascending, then the others, to ``tiles``; return how many hold one."""
    num_tiles = tl.cdiv(N, WIDTH)
    tile_offs = tl.arange(0, TILE_BLOCK)
    kept_tiles = tl.zeros((), dtype=tl.int32)
    for t0 in range(0, num_tiles, TILE_BLOCK):
        elems = (t0 + tile_offs)[:, None] * WIDTH + tl.arange(0, WIDTH)[None, :]
        tile_kept = tl.max((tl.load(mask_ptr + elems, mask=elems < N, other=0) != 0).to(tl.int32), axis=1)
        kept_tiles += tl.sum(tile_kept, axis=0)
    kept_before = tl.zeros((), dtype=tl.int32)
    for t0 in range(0, num_tiles, TILE_BLOCK):
        tiles = t0 + tile_offs
        elems = tiles[:, None] * WIDTH + tl.arange(0, WIDTH)[None, :]
        tile_kept = tl.max((tl.load(mask_ptr + elems, mask=elems < N, other=0) != 0).to(tl.int32), axis=1)
        kept_through = kept_before + tl.cumsum(tile_kept, axis=0)
        slot = tl.where(tile_kept != 0, kept_through - 1, kept_tiles + tiles - kept_through)
        tl.store(tiles_ptr + slot, tiles, mask=tiles < num_tiles)
        kept_before += tl.sum(tile_kept, axis=0)
    return kept_tiles


@triton.jit
def _mask_plan_kernel(
    mask_ptr, snapshot_ptr, state_ptr, order_ptr, count_ptr, tiles_ptr, tile_counts_ptr, N,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """Refresh a cached plan of the keep-mask ``mask`` (N bytes) in place, on the device: compare the
    mask with the ``snapshot`` the plan was built from and, only where they differ (or ``state`` is
    0: never built), rebuild the plan (:class:`~loraprune.ops.masked_lora_linear.MaskPlan`: the
    kept-first ``order`` and ``count``, the kept-first K ``tiles`` and ``tile_counts`` per width of
    K_TILE_WIDTHS) and the snapshot. One program, so that the comparison decides the rebuild with
    no host synchronisation; the plan's buffers keep their addresses (CUDA graphs replay it). Each
    pass re-reads the mask, so no pass reads what another thread of the program wrote."""
    offs = tl.arange(0, BLOCK)
    changed = (tl.load(state_ptr) == 0).to(tl.int32)
    for start in range(0, N, BLOCK):
        idx = start + offs
        ok = idx < N
        live = tl.load(mask_ptr + idx, mask=ok, other=0) != 0
        seen = tl.load(snapshot_ptr + idx, mask=ok, other=0) != 0
        changed = changed | tl.max((live != seen).to(tl.int32), axis=0)
    if changed != 0:
        total = tl.zeros((), dtype=tl.int32)
        for start in range(0, N, BLOCK):
            idx = start + offs
            ok = idx < N
            total += tl.sum((tl.load(mask_ptr + idx, mask=ok, other=0) != 0).to(tl.int32), axis=0)
        kept_before = tl.zeros((), dtype=tl.int32)
        for start in range(0, N, BLOCK):
            idx = start + offs
            ok = idx < N
            keep = (tl.load(mask_ptr + idx, mask=ok, other=0) != 0).to(tl.int32)
            kept_through = kept_before + tl.cumsum(keep, axis=0)  # kept features up to idx, included
            slot = tl.where(keep != 0, kept_through - 1, total + idx - kept_through)
            tl.store(order_ptr + slot, idx.to(tl.int64), mask=ok)
            tl.store(snapshot_ptr + idx, keep.to(tl.uint8), mask=ok)
            kept_before += tl.sum(keep, axis=0)
        tl.store(count_ptr, total.to(tl.int64))
        list_offset = tl.zeros((), dtype=tl.int32)
        for i in tl.static_range(K_TILE_WIDTH_COUNT):
            kept_tiles = _kept_first_tiles(
                mask_ptr, tiles_ptr + list_offset, N, K_TILE_MIN_WIDTH << i, BLOCK // (K_TILE_MIN_WIDTH << i)
            )
            tl.store(tile_counts_ptr + i, kept_tiles)
            list_offset += tl.cdiv(N, K_TILE_MIN_WIDTH << i)
        tl.store(state_ptr, 1)


class CachedMaskPlan:
    """The device buffers of one keep-mask's cached plan (its kept-first order and count, its kept
    K-tile lists, and the snapshot of the mask they were built from), refreshed in place by
    :meth:`refresh`: one launch per call, which compares the mask with the snapshot and rebuilds
    only where they differ, on the device (no host synchronisation, so it runs inside a CUDA graph
    capture, and a replay refreshes the plan too). The buffers are allocated once and never
    replaced, so that a captured graph never reads freed memory."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.snapshot = torch.zeros(size, device=device, dtype=torch.bool)
        self.state = torch.zeros(1, device=device, dtype=torch.int32)  # 0: not built yet
        self.order = torch.empty(size, device=device, dtype=torch.int64)
        self.count = torch.empty((), device=device, dtype=torch.int64)
        num_tiles = sum(-(-size // width) for width in K_TILE_WIDTHS)
        self.tiles = torch.empty(num_tiles, device=device, dtype=torch.int32)
        self.tile_counts = torch.empty(len(K_TILE_WIDTHS), device=device, dtype=torch.int32)

    def refresh(self, mask: torch.Tensor) -> CachedMaskPlan:
        """Bring the plan up to date with ``mask`` (bool, the size and device of the buffers)."""
        if mask.shape != self.snapshot.shape or mask.device != self.snapshot.device:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} on {mask.device} for a plan of "
                f"{tuple(self.snapshot.shape)} on {self.snapshot.device}"
            )
        with device_guard(mask.device):
            _mask_plan_kernel[(1,)](
                mask.contiguous().view(torch.uint8), self.snapshot.view(torch.uint8), self.state, self.order,
                self.count, self.tiles, self.tile_counts, mask.shape[0], BLOCK=MASK_PLAN_BLOCK, num_warps=8,
            )  # fmt: skip
        return self


class KeptFirst(NamedTuple):
    """A keep-mask as a permutation of its axis: ``order`` (int64) lists the kept indices in
    ascending order, then the masked ones; ``count``, a 0-d int64 tensor on the same device, is the
    number kept (the kernels read it from device memory)."""

    order: torch.Tensor
    count: torch.Tensor


class KeptTiles(NamedTuple):
    """An input mask applied to the loaded tiles, with a plan's lists of the K tiles holding a kept
    feature (``in_tiles``/``in_tile_counts`` of a :class:`MaskPlan`): the K loops visit those only."""

    mask: torch.Tensor
    tiles: torch.Tensor
    counts: torch.Tensor


# A mask along one kernel axis: a bool keep-mask applied to the loaded tiles (KeptTiles: and its
# kept K tiles), a KeptFirst gathered through, or None (every index kept, no indirection).
AxisMask = torch.Tensor | KeptTiles | KeptFirst | None


def _axis_args(mask: AxisMask, placeholder: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel arguments ``(mask, order, count)`` for ``mask``: a bool mask goes as bytes (a free
    view); the arguments a kernel does not read (its HAS_MASK / GATHER flags say which) are a
    placeholder."""
    if isinstance(mask, KeptFirst):
        return placeholder, mask.order, mask.count
    if mask is None:
        return placeholder, placeholder, placeholder
    if isinstance(mask, KeptTiles):
        mask = mask.mask
    return mask.view(torch.uint8), placeholder, placeholder


def _tile_args(mask: AxisMask, placeholder: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel arguments ``(tiles, tile_counts)`` for ``mask`` (placeholders unless KeptTiles)."""
    return (mask.tiles, mask.counts) if isinstance(mask, KeptTiles) else (placeholder, placeholder)


def _keep_scale(dropout_p: float) -> float:
    return 1.0 / (1.0 - dropout_p)


def hidden_width(rank: int) -> int:
    """Columns of the LoRA hiddens H and G the kernels store: the rank rounded up to 16, zeros past
    it. Triton specialises only integers divisible by 16, so H's row stride and the bound of its
    loads are 16-divisible at any rank, and its tiles load vectorised (and the GEMM's lora_k_steps
    keeps L's and Rt's loads vectorised: its steps select between L's and H's pointers)."""
    return -(-rank // 16) * 16


def _lora_down(
    lhs: torch.Tensor,
    f: torch.Tensor,
    mask: torch.Tensor | KeptTiles | None,
    seed: torch.Tensor | None,
    dropout_p: float,
    kind: str,
    compact: bool = False,
    bits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lhs ⊙ mask ⊙ drop) · Fᵀ`` in ``lhs.dtype``, M×:func:`hidden_width` (zeros past r), for
    ``lhs`` (M×Q) and ``f`` (r×Q, any strides), and, with ``compact``, ``lhs⊙mask`` with its kept
    columns in kept-first order (M×Q: zero for ``COMPACT_TAIL`` columns after the kept ones, then
    unwritten), else ``lhs`` itself. With ``bits`` (uint8, M×⌈Q/8⌉) the dropout keep-mask is
    stored there (``dropout_bits`` path; with kept K tiles, zeros for the skipped ones)."""
    num_rows, reduce_len = lhs.shape
    rank = f.shape[0]
    out = torch.empty((num_rows, hidden_width(rank)), device=lhs.device, dtype=lhs.dtype)
    lhs_kept = torch.empty_like(lhs) if compact else lhs
    bits_arg = lhs if bits is None else bits
    block_r = padded_rank(rank, MAX_RANK_BLOCK)

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(num_rows, meta["BLOCK_M"]), triton.cdiv(rank, block_r)

    _lora_down_kernel[grid](
        lhs, f, _axis_args(mask, lhs)[0], *_tile_args(mask, lhs), lhs if seed is None else seed, out, lhs_kept,
        bits_arg,
        num_rows, reduce_len, rank, out.shape[1], m_bucket(num_rows), dropout_p, _keep_scale(dropout_p),
        lhs.stride(0), lhs.stride(1), f.stride(0), f.stride(1), out.stride(0), out.stride(1),
        lhs_kept.stride(0), lhs_kept.stride(1), bits_arg.stride(0),
        HAS_MASK=mask is not None, COMPACT=compact, K_TILES=isinstance(mask, KeptTiles),
        LORA_DROPOUT=seed is not None, STORE_BITS=bits is not None,
        DOT_PRECISION=dot_precision(lhs.dtype), KIND=kind, BLOCK_R=block_r,
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
    bits: torch.Tensor | None = None,
) -> None:
    """Write ``s · (lhs ⊙ mask ⊙ drop)ᵀ · hidden`` into ``out`` (P×r, any strides: a transposed view
    writes the transpose; ``hidden``: M×r or wider with zeros past r, as :func:`_lora_down` makes
    it); with a gathered mask ``lhs`` comes in kept-first order (from :func:`_lora_down`); with
    ``bits`` the dropout keep-mask is read from the forward's bits."""
    num_rows, num_cols = lhs.shape
    rank = out.shape[1]
    block_r = padded_rank(rank, MAX_RANK_BLOCK)
    bits_arg = lhs if bits is None else bits

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(num_cols, meta["BLOCK_P"]), triton.cdiv(rank, block_r)

    _lora_grad_kernel[grid](
        lhs, hidden, *_axis_args(mask, lhs), lhs if seed is None else seed, bits_arg, out,
        num_rows, num_cols, rank, hidden.shape[1], m_bucket(num_rows), scaling, dropout_p,
        _keep_scale(dropout_p),
        lhs.stride(0), lhs.stride(1), hidden.stride(0), hidden.stride(1), out.stride(0), out.stride(1),
        bits_arg.stride(0),
        HAS_MASK=isinstance(mask, (torch.Tensor, KeptTiles)), GATHER=isinstance(mask, KeptFirst),
        LORA_DROPOUT=seed is not None, KEEP_BITS=bits is not None, DOT_PRECISION=dot_precision(lhs.dtype),
        KIND=kind, BLOCK_R=block_r,
    )  # fmt: skip


class GemmPaths(NamedTuple):
    """The GEMM fast paths a call may take (``FAST_PATHS`` names): ``lora_k_steps`` (the LoRA term
    as extra K steps; not where it carries the dropout, dX in training), ``persistent`` (one
    program per SM looping over the tiles) and ``tma`` (tensor-descriptor loads, on compute
    capability >= 9.0 where the operands are 16-byte aligned; it takes precedence over
    ``lora_k_steps``, whose steps select between pointers a descriptor load cannot)."""

    lora_k_steps: bool = False
    persistent: bool = False
    tma: bool = False


NO_GEMM_PATHS = GemmPaths()


def _tma_describable(t: torch.Tensor) -> bool:
    """Whether a 2-D tensor, or its transpose, can back a TMA descriptor: 16-byte aligned base, one
    unit stride, the other a multiple of 16 bytes and at least the extent along the unit stride
    (rows that do not overlap: a gradient expanded from one row has row stride 0, e.g. from
    ``y.backward(v.expand_as(y))``, and is read through pointers instead)."""
    size = t.element_size()
    if t.data_ptr() % 16:
        return False
    rows, cols = t.shape
    return (t.stride(1) == 1 and t.stride(0) >= max(cols, 1) and t.stride(0) * size % 16 == 0) or (
        t.stride(0) == 1 and t.stride(1) >= max(rows, 1) and t.stride(1) * size % 16 == 0
    )


def _scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    return torch.empty(size, device="cuda", dtype=torch.int8)


def _ensure_scratch_allocator() -> None:
    """Descriptors made in a kernel live in global scratch memory that Triton allocates at launch
    through ``triton.set_allocator``; set torch's caching allocator (CUDA-graph safe) unless the
    application set one. Per call: the allocator is a context variable, unset in new threads
    (autograd's backward runs in its own)."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


@functools.cache
def _persistent_programs(device: torch.device) -> int:
    """Programs of the persistent schedule: one per SM; three in the interpreter, so that each
    program runs several tiles."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 3


def _k_steps_factor(f: torch.Tensor, scaling: float, rt: torch.Tensor, width: int) -> torch.Tensor:
    """``s·F`` in Rt's dtype, padded to ``width`` rows (a multiple of 16; zeros past r) and laid out
    as Rt is (contiguous along the axis along which Rt is), with 16-divisible strides:
    lora_k_steps loads it as Rt's continuation, through the same vectorised loads."""
    rank, cols = f.shape
    if rt.stride(0) == 1 and rt.stride(1) != 1:  # Rt = Wᵀ (the forward): contiguous along K
        factor = torch.zeros((cols, width), device=f.device, dtype=rt.dtype).t()
    else:
        factor = torch.zeros((width, -(-cols // 16) * 16), device=f.device, dtype=rt.dtype)[:, :cols]
    torch.mul(f, scaling, out=factor[:rank])
    return factor


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
    bits: torch.Tensor | None = None,
    paths: GemmPaths = NO_GEMM_PATHS,
) -> torch.Tensor:
    """``((lhs⊙q_mask) Rt + s·(hidden F)⊙drop + bias) ⊙ p_mask`` (M×P) in ``lhs.dtype``, for ``lhs``
    (M×Q), ``rt`` (Q×P), ``hidden`` (M×r, or wider with zeros past r: :func:`hidden_width`) and
    ``f`` (r×P); ``rt`` and ``f`` may be transposed views.
    With a gathered ``q_mask``, ``lhs`` comes in kept-first order (from :func:`_lora_down`); with
    ``bits`` the dropout keep-mask (over the output columns) is read from the forward's bits.
    ``paths``: the GEMM fast paths allowed (each taken only where it applies, see GemmPaths)."""
    num_rows, reduce_len = lhs.shape
    rank, num_cols = f.shape
    out = torch.empty((num_rows, num_cols), device=lhs.device, dtype=lhs.dtype)
    bits_arg = lhs if bits is None else bits
    gathered = isinstance(q_mask, KeptFirst) or isinstance(p_mask, KeptFirst)
    tma = (
        paths.tma
        and target_major(lhs.device) >= 9
        and lhs.stride(1) == 1
        and _tma_describable(lhs)
        and (gathered or _tma_describable(rt))
    )
    k_steps = paths.lora_k_steps and not tma and seed is None and lhs.dtype == rt.dtype == hidden.dtype
    if k_steps:
        width = hidden_width(rank)
        if hidden.shape[1] < width or hidden.stride(1) != 1 or hidden.stride(0) % 16:
            padded = torch.zeros((num_rows, width), device=hidden.device, dtype=hidden.dtype)
            padded[:, :rank] = hidden[:, :rank]
            hidden = padded
        hidden = hidden[:, :width]
        f = _k_steps_factor(f, scaling, rt, width)
    if tma and lhs.is_cuda:
        _ensure_scratch_allocator()
    programs = _persistent_programs(lhs.device) if paths.persistent else 0

    def grid(meta: dict) -> tuple[int]:
        tiles = triton.cdiv(num_rows, meta["BLOCK_M"]) * triton.cdiv(num_cols, meta["BLOCK_P"])
        return (min(tiles, programs) if programs else tiles,)

    _masked_lora_gemm_kernel[grid](
        lhs, rt, hidden, f, lhs if bias is None else bias, *_axis_args(q_mask, lhs), *_tile_args(q_mask, lhs),
        *_axis_args(p_mask, lhs), lhs if seed is None else seed, bits_arg, out,
        num_rows, num_cols, reduce_len, rank, hidden.shape[1], m_bucket(num_rows), scaling, dropout_p,
        _keep_scale(dropout_p),
        lhs.stride(0), lhs.stride(1), rt.stride(0), rt.stride(1), hidden.stride(0), hidden.stride(1),
        f.stride(0), f.stride(1), out.stride(0), out.stride(1), bits_arg.stride(0),
        HAS_BIAS=bias is not None,
        HAS_QMASK=isinstance(q_mask, (torch.Tensor, KeptTiles)), Q_GATHER=isinstance(q_mask, KeptFirst),
        Q_TILES=isinstance(q_mask, KeptTiles),
        HAS_PMASK=isinstance(p_mask, torch.Tensor), P_GATHER=isinstance(p_mask, KeptFirst),
        LORA_DROPOUT=seed is not None, KEEP_BITS=bits is not None, LORA_K_STEPS=k_steps,
        PERSISTENT=bool(programs), TMA=tma, RT_TRANSPOSED=rt.stride(1) != 1,
        DOT_PRECISION=dot_precision(lhs.dtype), KIND=kind, BLOCK_R=padded_rank(rank, MAX_RANK_BLOCK),
    )  # fmt: skip
    return out


def _decode(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    in_mask: torch.Tensor | None,
    out_axis: KeptFirst | torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward ``(Y, H)`` for at most :data:`DECODE_MAX_ROWS` tokens in one launch (``out_axis``:
    the output mask gathered, applied in place, or none; H: M×:func:`hidden_width`)."""
    num_rows, in_features = x.shape
    out_features, rank = weight.shape[0], lora_a.shape[0]
    y = torch.empty((num_rows, out_features), device=x.device, dtype=x.dtype)
    hidden = torch.empty((num_rows, hidden_width(rank)), device=x.device, dtype=x.dtype)
    pmask, order, count = _axis_args(out_axis, x)

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(out_features, meta["BLOCK_P"]),)

    _decode_kernel[grid](
        x, weight, lora_a, lora_b, x if bias is None else bias, x if in_mask is None else in_mask.view(torch.uint8),
        pmask, order, count, y, hidden,
        num_rows, out_features, in_features, rank, hidden.shape[1], scaling,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), lora_a.stride(0), lora_a.stride(1),
        lora_b.stride(0), lora_b.stride(1), y.stride(0), y.stride(1), hidden.stride(0), hidden.stride(1),
        HAS_BIAS=bias is not None, HAS_QMASK=in_mask is not None,
        HAS_PMASK=isinstance(out_axis, torch.Tensor), P_GATHER=isinstance(out_axis, KeptFirst),
        DOT_PRECISION=dot_precision(x.dtype),
        BLOCK_R=padded_rank(rank), BLOCK_M=DECODE_MAX_ROWS,
    )  # fmt: skip
    return y, hidden


@functools.cache
def _decode_split_programs(device: torch.device) -> int:
    """Programs that fill the device at decode: two per SM; eight in the interpreter, so that the
    tests' small layers split."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def decode_splits(out_features: int, in_features: int, device: torch.device) -> int:
    """K splits of the split-K decode: enough for ``cdiv(out, DECODE_SPLIT_BLOCK_P)`` column tiles
    to fill the device, each split at least DECODE_SPLIT_MIN_K features; 1: not worth splitting.
    From the shapes and the device only, so a layer's workspace has one shape."""
    column_tiles = triton.cdiv(out_features, DECODE_SPLIT_BLOCK_P)
    if column_tiles == 0:
        return 1
    wanted = triton.cdiv(_decode_split_programs(device), column_tiles)
    return max(1, min(wanted, in_features // DECODE_SPLIT_MIN_K, DECODE_MAX_SPLITS))


def _decode_split_k(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    in_mask: torch.Tensor | None,
    out_axis: KeptFirst | torch.Tensor | None,
    splits: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward ``(Y, H)`` for at most :data:`DECODE_MAX_ROWS` tokens with K in ``splits``
    ranges of whole :data:`DECODE_SPLIT_GRANULE` granules: two launches through an fp32 workspace
    of splits×M×(out + rank block)."""
    num_rows, in_features = x.shape
    out_features, rank = weight.shape[0], lora_a.shape[0]
    block_r = padded_rank(rank)
    y = torch.empty((num_rows, out_features), device=x.device, dtype=x.dtype)
    hidden = torch.empty((num_rows, hidden_width(rank)), device=x.device, dtype=x.dtype)
    part = torch.empty((splits, num_rows, out_features), device=x.device, dtype=torch.float32)
    h_part = torch.empty((splits, num_rows, block_r), device=x.device, dtype=torch.float32)
    pmask, order, count = _axis_args(out_axis, x)
    gather = isinstance(out_axis, KeptFirst)
    column_tiles = triton.cdiv(out_features, DECODE_SPLIT_BLOCK_P)
    _decode_split_kernel[(column_tiles + 1, splits)](
        x, weight, lora_a, x if in_mask is None else in_mask.view(torch.uint8), order, count, part, h_part,
        num_rows, out_features, in_features, rank, splits,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), lora_a.stride(0), lora_a.stride(1),
        HAS_QMASK=in_mask is not None, P_GATHER=gather, DOT_PRECISION=dot_precision(x.dtype),
        GRANULE=DECODE_SPLIT_GRANULE, BLOCK_R=block_r, BLOCK_M=DECODE_MAX_ROWS, BLOCK_P=DECODE_SPLIT_BLOCK_P,
    )  # fmt: skip
    reduce_block = 64
    _decode_reduce_kernel[(triton.cdiv(out_features, reduce_block),)](
        part, h_part, lora_b, x if bias is None else bias, pmask, order, count, y, hidden,
        num_rows, out_features, rank, hidden.shape[1], splits, scaling,
        lora_b.stride(0), lora_b.stride(1), y.stride(0), y.stride(1), hidden.stride(0), hidden.stride(1),
        HAS_BIAS=bias is not None, HAS_PMASK=isinstance(out_axis, torch.Tensor), P_GATHER=gather,
        DOT_PRECISION=dot_precision(x.dtype), BLOCK_R=block_r, BLOCK_M=DECODE_MAX_ROWS, BLOCK_P=reduce_block,
        num_warps=4,
    )  # fmt: skip
    return y, hidden


def _contiguous(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The kernels read masks as contiguous bytes: a strided or expanded mask is copied."""
    return None if mask is None else mask.contiguous()


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Activations need a unit stride along features for coalesced loads; other strides are fine."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _out_axis(
    out_mask: torch.Tensor | None, out_order: torch.Tensor | None, out_count: torch.Tensor | None
) -> KeptFirst | torch.Tensor | None:
    """The output mask as the kernels take it: gathered through its kept-first order when given
    (a :class:`MaskPlan`'s), else applied in place (every feature computed, the masked ones zeroed)."""
    if out_mask is None:
        return None
    return out_mask if out_order is None else KeptFirst(out_order, out_count)


@contextlib.contextmanager
def _capture_hint(device: torch.device) -> Iterator[None]:
    """Name the likely cause when a launch fails inside a CUDA graph capture: the autotuner
    benchmarks (and synchronises) on the first call with each new key, which a capture forbids."""
    try:
        yield
    except RuntimeError as exc:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "masked_lora_linear failed inside a CUDA graph capture, most likely because a Triton "
                "kernel met a new autotune key (shape bucket, masks gathered or applied in place, "
                "dropout, fast paths): run the captured step once eagerly, with the same shapes, "
                "masks, training mode and LORAPRUNE_MLL_FAST_PATHS, before capturing (README, "
                f"'Kernels and backends'). Cause: {exc}"
            ) from exc
        raise


def _keep_bits_shape(x: torch.Tensor, keep_bits: bool, seed: torch.Tensor | None) -> tuple[int, ...]:
    """Shape of the stored dropout keep-mask: one bit per element of X, or empty when not stored."""
    return (x.shape[0], triton.cdiv(x.shape[1], 8)) if keep_bits and seed is not None else (0,)


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
    out_order: torch.Tensor | None = None,
    out_count: torch.Tensor | None = None,
    in_tiles: torch.Tensor | None = None,
    in_tile_counts: torch.Tensor | None = None,
    keep_bits: bool = False,
    decode: bool = False,
    lora_k_steps: bool = False,
    persistent: bool = False,
    tma: bool = False,
    decode_split_k: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op on 2-D ``x`` (M×in) in ``weight.dtype``; dropout is on iff ``seed`` is given.

    ``out_order``/``out_count`` and ``in_tiles``/``in_tile_counts`` come from a
    :class:`~loraprune.ops.masked_lora_linear.MaskPlan` of the masks: with the kept-first order the
    kept output features are gathered, without it ``out_mask`` is applied in place; without the
    tile lists the K loops visit every tile.
    ``keep_bits`` stores the dropout keep-mask for the backward; ``decode`` takes the one-launch
    path for M <= 16 tokens without dropout; ``lora_k_steps``, ``persistent`` and ``tma`` allow the
    GEMM fast paths (:class:`GemmPaths`) in the forward and in dX; ``decode_split_k`` the split-K
    decode where :func:`decode_splits` splits (it takes precedence over ``decode``).

    Returns ``Y``, the LoRA hidden ``H = drop(X⊙m_in) Aᵀ`` (M×:func:`hidden_width`, zeros past r)
    that the backward reuses, and the keep bits (uint8, M×⌈in/8⌉; empty unless stored).
    """
    x = _rows_contiguous(x)
    out_mask, in_mask = _contiguous(out_mask), _contiguous(in_mask)
    num_rows, rank = x.shape[0], lora_a.shape[0]
    bits = x.new_empty(_keep_bits_shape(x, keep_bits, seed), dtype=torch.uint8)
    if num_rows == 0:  # no launch: autotuning an empty grid would keep its pick for M <= 16
        return x.new_empty((0, weight.shape[0])), x.new_empty((0, hidden_width(rank))), bits
    with device_guard(x.device), _capture_hint(x.device):
        out_axis = _out_axis(out_mask, out_order, out_count)
        decode_sized = num_rows <= DECODE_MAX_ROWS and seed is None and rank <= MAX_RANK_BLOCK
        splits = decode_splits(*weight.shape, x.device) if decode_split_k and decode_sized else 1
        if splits > 1:
            y, hidden = _decode_split_k(x, weight, bias, lora_a, lora_b, scaling, in_mask, out_axis, splits)
            return y, hidden, bits
        if decode and decode_sized:
            y, hidden = _decode(x, weight, bias, lora_a, lora_b, scaling, in_mask, out_axis)
            return y, hidden, bits
        q_mask = (
            in_mask if in_tiles is None or in_mask is None else KeptTiles(in_mask, in_tiles, in_tile_counts)
        )
        hidden, _ = _lora_down(x, lora_a, q_mask, seed, dropout_p, "h", bits=bits if bits.numel() else None)
        # Transposed views (no copies) give the GEMM its (Q×P) and (r×P) operands.
        y = _masked_gemm(
            x, weight.t(), hidden, lora_b.t(), scaling, bias, q_mask, out_axis, None, 0.0, "forward",
            paths=GemmPaths(lora_k_steps, persistent, tma),
        )  # fmt: skip
    return y, hidden, bits


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
    out_order: torch.Tensor | None,
    out_count: torch.Tensor | None,
    keep_bits: torch.Tensor | None,
    needs_x: bool,
    needs_a: bool,
    needs_b: bool,
    lora_k_steps: bool = False,
    persistent: bool = False,
    tma: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dX, dA, dB)``; a gradient not asked for comes back as an empty placeholder. With
    ``keep_bits`` (the forward's) dA and dX read the dropout keep-mask instead of recomputing it;
    ``lora_k_steps``, ``persistent`` and ``tma``: the GEMM fast paths dX may take."""
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
    bits = keep_bits if seed is not None and keep_bits is not None and keep_bits.numel() else None
    with device_guard(grad_y.device), _capture_hint(grad_y.device):
        out_axis = _out_axis(out_mask, out_order, out_count)
        gathered = isinstance(out_axis, KeptFirst)
        # G's kernel reads dY anyway: with a gathered output mask it also writes the compact D
        # (grad_d: D's kept columns in kept-first order) that dB and dX read contiguously (module
        # docstring); an output mask applied in place is applied to dY's tiles by each kernel.
        grad_d = grad_y
        if needs_x or needs_a or gathered:
            grad_hidden, grad_d = _lora_down(grad_y, lora_b.t(), out_mask, None, 0.0, "g", gathered)
        if needs_b:
            grad_b = torch.empty(lora_b.shape, device=lora_b.device, dtype=lora_b.dtype)
            _lora_grad(grad_d, hidden, grad_b, scaling, out_axis, None, 0.0, "db")
        if needs_a:
            grad_a = torch.empty(lora_a.shape, device=lora_a.device, dtype=lora_a.dtype)
            _lora_grad(x, grad_hidden, grad_a.t(), scaling, in_mask, seed, dropout_p, "da", bits)
        if needs_x:
            grad_x = _masked_gemm(
                grad_d,
                weight,
                grad_hidden,
                lora_a,
                scaling,
                None,
                out_axis,
                in_mask,
                seed,
                dropout_p,
                "dx",
                bits,
                GemmPaths(lora_k_steps, persistent, tma),
            )
    return grad_x, grad_a, grad_b


@masked_lora_linear_op.register_fake
def _(
    x,
    weight,
    bias,
    lora_a,
    lora_b,
    scaling,
    out_mask,
    in_mask,
    dropout_p,
    seed,
    out_order=None,
    out_count=None,
    in_tiles=None,
    in_tile_counts=None,
    keep_bits=False,
    decode=False,
    lora_k_steps=False,
    persistent=False,
    tma=False,
    decode_split_k=False,
):
    return (
        x.new_empty((x.shape[0], weight.shape[0])),
        x.new_empty((x.shape[0], hidden_width(lora_a.shape[0]))),
        x.new_empty(_keep_bits_shape(x, keep_bits, seed), dtype=torch.uint8),
    )


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
    out_order,
    out_count,
    keep_bits,
    needs_x,
    needs_a,
    needs_b,
    lora_k_steps=False,
    persistent=False,
    tma=False,
):
    def grad_like(t: torch.Tensor, needed: bool) -> torch.Tensor:
        return t.new_empty(t.shape) if needed else grad_y.new_empty(0)

    return grad_like(x, needs_x), grad_like(lora_a, needs_a), grad_like(lora_b, needs_b)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, _bias, lora_a, lora_b, scaling, out_mask, in_mask, dropout_p, seed, out_order, out_count = (
        inputs[:12]
    )
    _y, hidden, keep_bits = output
    ctx.save_for_backward(
        x, weight, lora_a, lora_b, hidden, out_mask, in_mask, seed, out_order, out_count, keep_bits
    )
    ctx.scaling = scaling
    ctx.dropout_p = dropout_p
    ctx.gemm_paths = tuple(inputs[16:19])  # lora_k_steps, persistent, tma: dX takes them too


def _backward_rule(
    ctx, grad_y: torch.Tensor, _grad_hidden: torch.Tensor | None, _grad_bits: torch.Tensor | None
):
    x, weight, lora_a, lora_b, hidden, out_mask, in_mask, seed, out_order, out_count, keep_bits = (
        ctx.saved_tensors
    )
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
        out_order,
        out_count,
        keep_bits,
        needs_x,
        needs_a,
        needs_b,
        *ctx.gemm_paths,
    )
    no_grads = (None,) * (len(ctx.needs_input_grad) - 5)
    return (
        grad_x if needs_x else None,
        None,
        None,
        grad_a if needs_a else None,
        grad_b if needs_b else None,
        *no_grads,
    )


masked_lora_linear_op.register_autograd(_backward_rule, setup_context=_setup_context)


def draw_dropout_seed(device: torch.device) -> torch.Tensor:
    """A dropout seed from torch's default generator for ``device``, kept on the device (no sync)."""
    return torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64)


def dropout_keep_mask(
    seed: torch.Tensor, num_rows: int, num_cols: int, dropout_p: float, *, dropout_bits: bool = False
) -> torch.Tensor:
    """The (num_rows × num_cols) bool keep-mask the kernels apply to ``X⊙m_in`` for ``seed``, as the
    ``dropout_bits`` path draws it (four outputs per 7-round philox call) or the old path."""
    out = torch.empty((num_rows, num_cols), device=seed.device, dtype=torch.int8)
    block = 32
    with device_guard(seed.device):
        _keep_mask_kernel[(triton.cdiv(num_rows, block), triton.cdiv(num_cols, block))](
            seed, out, num_rows, num_cols, dropout_p, PHILOX4=dropout_bits, BLOCK_M=block, BLOCK_Q=block
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
    *,
    plan: MaskPlan | None = None,
    fast_paths: Collection[str] | None = None,
) -> torch.Tensor:
    """``((X⊙m_in) Wᵀ + b + s·drop(X⊙m_in) Aᵀ Bᵀ) ⊙ m_out`` for ``x`` of any leading shape.

    Arguments as :func:`loraprune.ops.masked_lora_linear` (validated there). Differentiable in
    ``x``, ``lora_a`` and ``lora_b``; the LoRA factors keep their dtype (their tiles are cast to
    the compute dtype in the kernels), ``x`` and ``weight`` are cast to the compute dtype (a
    no-op, never a copy, when they already have it). ``plan``: the masks' :class:`MaskPlan` (its
    masks replace ``out_mask``/``in_mask``; made here when not given, gathering the output mask);
    ``fast_paths``: the fast paths to take (default: ``LORAPRUNE_MLL_FAST_PATHS``, see
    :func:`~loraprune.ops.masked_lora_linear.enabled_fast_paths`).
    """
    if torch.is_grad_enabled():
        for name, frozen in (("weight", weight), ("bias", bias)):
            if frozen is not None and frozen.requires_grad:
                raise ValueError(
                    f"{name} requires grad, but the Triton kernels compute no {name} gradient (the base "
                    f"layer is frozen): freeze it ({name}.requires_grad_(False)) or use backend='torch'"
                )
    paths = enabled_fast_paths() if fast_paths is None else frozenset(fast_paths)
    if plan is None:
        plan = masked_lora_linear_plan(out_mask, in_mask, k_tiles="k_tiles" in paths)
    k_tiles = "k_tiles" in paths
    dtype = _compute_dtype(x, weight)
    seed = draw_dropout_seed(x.device) if training and dropout_p > 0 else None
    x_2d = x.to(dtype).reshape(-1, x.shape[-1])
    y, _, _ = masked_lora_linear_op(
        x_2d,
        weight.to(dtype),
        bias,
        lora_a,
        lora_b,
        scaling,
        plan.out_mask,
        plan.in_mask,
        dropout_p if seed is not None else 0.0,
        seed,
        plan.out_order,
        plan.out_count,
        plan.in_tiles if k_tiles else None,
        plan.in_tile_counts if k_tiles else None,
        "dropout_bits" in paths,
        "decode" in paths,
        "lora_k_steps" in paths,
        "persistent" in paths,
        "tma" in paths,
        "decode_split_k" in paths,
    )
    return y.view(*x.shape[:-1], weight.shape[0])
