"""Fold per-matrix importance vectors into structure scores and update their moving average.

A structure group (the heads of one layer, or its MLP channels) has ``n`` units. Each member
matrix contributes one importance vector (its rows or its columns) whose length is a multiple
of ``n``; unit ``u`` owns the ``u``-th contiguous chunk (``head_dim`` rows for an MHA head,
``g·head_dim`` for a GQA group of ``g`` query heads, 1 for an MLP channel). One update::

    now  = Σ_parts  fold(p / ‖p‖₂)                  (a zero vector contributes zeros)
    S    = now                     if no update was applied yet
    S    = decay·S + (1−decay)·now otherwise

and a step whose ``now`` holds NaN/Inf is skipped (``num_skipped += 1``), never merged. All
state stays on the device: no host synchronisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loraprune.ops._checks import FLOAT_DTYPES, check_scalar, check_tensor
from loraprune.ops._dispatch import resolve

IMPLEMENTATIONS = {
    "cuda": "loraprune.ops.cuda:score_update",
    "triton": "loraprune.kernels.score_update:score_update",
    "torch": "loraprune.ops.score_update:score_update_reference",
}

MAX_PARTS = 8


def validate(
    scores: torch.Tensor,
    parts: Sequence[torch.Tensor],
    decay: float,
    num_updates: torch.Tensor,
    num_skipped: torch.Tensor,
) -> None:
    check_tensor("scores", scores, ndim=1, dtypes=(torch.float32,))
    if not scores.is_contiguous():
        raise ValueError("scores must be contiguous (it is updated in place)")
    num_units = scores.shape[0]
    if num_units < 1:
        raise ValueError("scores must hold at least one unit")
    if not 1 <= len(parts) <= MAX_PARTS:
        raise ValueError(f"parts must hold 1 to {MAX_PARTS} vectors, got {len(parts)}")
    for i, part in enumerate(parts):
        check_tensor(f"parts[{i}]", part, ndim=1, dtypes=FLOAT_DTYPES, device=scores.device)
        if part.shape[0] == 0 or part.shape[0] % num_units:
            raise ValueError(
                f"parts[{i}] has length {part.shape[0]}, not a positive multiple of the "
                f"{num_units} units in scores"
            )
    check_scalar("decay", decay, low=0.0, high=1.0, high_inclusive=False)
    for name, counter in (("num_updates", num_updates), ("num_skipped", num_skipped)):
        check_tensor(name, counter, shape=(), dtypes=(torch.int64,), device=scores.device)


def score_update_reference(
    scores: torch.Tensor,
    parts: Sequence[torch.Tensor],
    decay: float,
    num_updates: torch.Tensor,
    num_skipped: torch.Tensor,
) -> None:
    now = torch.zeros_like(scores)
    for part in parts:
        part = part.float()
        norm = torch.linalg.vector_norm(part).clamp_min(torch.finfo(torch.float32).tiny)
        now += (part / norm).view(scores.shape[0], -1).sum(dim=1)
    finite = torch.isfinite(now).all()
    averaged = torch.where(num_updates == 0, now, decay * scores + (1.0 - decay) * now)
    scores.copy_(torch.where(finite, averaged, scores))
    num_updates.add_(finite.long())
    num_skipped.add_((~finite).long())


def score_update(
    scores: torch.Tensor,
    parts: Sequence[torch.Tensor],
    decay: float,
    num_updates: torch.Tensor,
    num_skipped: torch.Tensor,
    *,
    backend: str | None = None,
) -> None:
    """Update ``scores`` (float32, one entry per unit) in place from this step's ``parts``.

    Args:
        scores: running scores, float32 (n,), contiguous.
        parts: 1 to 8 importance vectors of lengths divisible by ``n``.
        decay: moving-average factor λ in [0, 1).
        num_updates, num_skipped: int64 0-dim counters on the same device, updated in place.
        backend: force a backend (default: automatic, see ``loraprune.ops``).
    """
    parts = list(parts)
    validate(scores, parts, decay, num_updates, num_skipped)
    _, impl = resolve("score_update", IMPLEMENTATIONS, scores.device, backend)
    impl(scores, parts, float(decay), num_updates, num_skipped)
