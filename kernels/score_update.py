"""Structure-score update in one launch: normalise each part, fold into units, sum, moving average.

A single program does the whole group (a few tens of thousands of elements at most): it makes two
passes over the parts, the first for the L2 norms, the second to fold and update. The step is
skipped (and counted) iff some part holds a NaN/Inf, which is exactly when the reference's ``now``
is non-finite: finite elements give finite norms (or +inf on overflow, which folds to zeros) and
normalised values of magnitude <= 1. The counters stay on the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from loraprune.kernels._utils import device_guard
from loraprune.ops.score_update import MAX_PARTS

FLOAT32_TINY = tl.constexpr(1.1754943508222875e-38)  # the reference clamps norms to finfo(float32).tiny
FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)
TILE_ELEMENTS = 2048


@triton.jit
def _score_update_kernel(
    scores_ptr, parts, widths, num_updates_ptr, num_skipped_ptr,
    num_units, decay, one_minus_decay,
    SLOTS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    # Read before anything else: thread 0 stores count + finite at the end, and parts of width 1
    # leave no barrier between a later load and that store, so a lagging warp could see the new
    # count and blend the first update instead of taking it.
    count = tl.load(num_updates_ptr)
    # Pass 1: the norms (kept in a small register vector, one slot per part) and a NaN/Inf count.
    slots = tl.arange(0, SLOTS)
    norms = tl.zeros((SLOTS,), dtype=tl.float32)
    bad = tl.zeros((BLOCK,), dtype=tl.int32)
    offs = tl.arange(0, BLOCK)
    for i in tl.static_range(len(parts)):
        length = num_units * widths[i]
        squares = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, length, BLOCK):
            idx = start + offs
            v = tl.load(parts[i] + idx, mask=idx < length, other=0.0).to(tl.float32)
            squares += v * v
            bad += (~(tl.abs(v) <= FLOAT32_MAX)).to(tl.int32)  # NaN fails every comparison
        norm = tl.maximum(tl.sqrt_rn(tl.sum(squares, axis=0)), FLOAT32_TINY)
        norms = tl.where(slots == i, norm, norms)
    finite = (tl.sum(bad, axis=0) == 0).to(tl.int32)

    # Pass 2 (skipped with the step): now = Σ fold(p / ‖p‖), then the moving average.
    offs_u = tl.arange(0, BLOCK_U)
    offs_w = tl.arange(0, BLOCK_W)
    for u0 in range(0, num_units * finite, BLOCK_U):
        units = u0 + offs_u
        unit_ok = units < num_units
        now = tl.zeros((BLOCK_U,), dtype=tl.float32)
        for i in tl.static_range(len(parts)):
            norm = tl.sum(tl.where(slots == i, norms, 0.0), axis=0)
            folded = tl.zeros((BLOCK_U, BLOCK_W), dtype=tl.float32)
            for w0 in range(0, widths[i], BLOCK_W):
                within = w0 + offs_w
                v = tl.load(
                    parts[i] + units[:, None] * widths[i] + within[None, :],
                    mask=unit_ok[:, None] & (within < widths[i])[None, :],
                    other=0.0,
                )
                folded += v.to(tl.float32) / norm
            now += tl.sum(folded, axis=1)
        old = tl.load(scores_ptr + units, mask=unit_ok, other=0.0)
        tl.store(
            scores_ptr + units, tl.where(count == 0, now, decay * old + one_minus_decay * now), mask=unit_ok
        )
    tl.store(num_updates_ptr, count + finite)
    tl.store(num_skipped_ptr, tl.load(num_skipped_ptr) + 1 - finite)


def score_update(
    scores: torch.Tensor,
    parts: Sequence[torch.Tensor],
    decay: float,
    num_updates: torch.Tensor,
    num_skipped: torch.Tensor,
) -> None:
    """Update ``scores`` and the two counters in place from this step's ``parts``.

    Arguments as :func:`loraprune.ops.score_update` (validated there).
    """
    num_units = scores.shape[0]
    parts = tuple(part.contiguous() for part in parts)
    widths = tuple(part.shape[0] // num_units for part in parts)
    block_w = min(triton.next_power_of_2(max(widths)), 256)
    with device_guard(scores.device):
        _score_update_kernel[(1,)](
            scores, parts, widths, num_updates, num_skipped,
            num_units, decay, 1.0 - decay,
            SLOTS=MAX_PARTS, BLOCK=TILE_ELEMENTS, BLOCK_U=TILE_ELEMENTS // block_w, BLOCK_W=block_w,
            num_warps=8,
        )  # fmt: skip
