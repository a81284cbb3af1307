"""Choosing which units to mask: exact counts, local or global ranking, monotone masks.

Counts follow one rule everywhere: at ratio ``r`` a group of ``n`` units loses
``floor(r·n + ½)`` of them, except that at least one unit (one per GQA block) is kept and
kept MLP channel counts are multiples of ``round_to`` (or all of them). A unit once masked
stays masked: new masks only add the lowest-scoring kept units.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from loraprune.structures import StructureGroup


def round_half_up(value: float) -> int:
    return math.floor(value + 0.5 + 1e-9)  # 1e-9: 0.5·7 must give 4 despite binary fractions


def clamp_kept(group: StructureGroup, keep: int) -> int:
    """Snap a kept count to what ``group`` allows (per-block equality, ``round_to``, at least one)."""
    n = group.num_units
    if group.blocks > 1:
        per_block = n // group.blocks
        return max(1, min(per_block, round_half_up(keep / group.blocks))) * group.blocks
    if group.round_to > 1 and keep < n:
        keep = min(n, max(group.round_to, round_half_up(keep / group.round_to) * group.round_to))
    return max(1, min(n, keep))


def prune_count(group: StructureGroup, ratio: float) -> int:
    """Units of ``group`` masked at ``ratio`` (local ranking)."""
    if group.blocks > 1:
        per_block = group.num_units // group.blocks
        keep = per_block - round_half_up(ratio * per_block)
        return group.num_units - clamp_kept(group, keep * group.blocks)
    return group.num_units - clamp_kept(group, group.num_units - round_half_up(ratio * group.num_units))


def grow_mask(keep: torch.Tensor, scores: torch.Tensor, target_pruned: int, blocks: int = 1) -> torch.Tensor:
    """Mask the lowest-scoring kept units until ``target_pruned`` are masked (per block: ``/blocks``).

    Ties go to the lower index. Never unmasks: a target below the current count changes nothing.
    """
    keep = keep.clone()
    keep_blocks, score_blocks = keep.view(blocks, -1), scores.view(blocks, -1)
    per_block_target = target_pruned // blocks
    for block_keep, block_scores in zip(keep_blocks, score_blocks, strict=True):
        need = per_block_target - int((~block_keep).sum())
        if need <= 0:
            continue
        candidates = block_keep.nonzero().squeeze(1)
        order = torch.sort(block_scores[candidates], stable=True).indices
        block_keep[candidates[order[:need]]] = False
    return keep


def global_prune_counts(
    groups: Sequence[StructureGroup],
    scores: Sequence[torch.Tensor],
    keeps: Sequence[torch.Tensor],
    ratio: float,
) -> list[int]:
    """Per-group masked counts when the units of each kind are ranked across layers.

    Each kind (attention, mlp) loses as many units in total as uniform pruning would; the
    lowest-scoring kept units go first, each group keeping at least its minimum. Counts are then
    snapped to each group's granularity, so the total can move by a few units.
    """
    counts = [int((~k).sum()) for k in keeps]
    for kind in {g.kind for g in groups}:
        members = [i for i, g in enumerate(groups) if g.kind == kind]
        need = sum(prune_count(groups[i], ratio) for i in members) - sum(counts[i] for i in members)
        if need <= 0:
            continue
        room = {i: groups[i].num_units - clamp_kept(groups[i], 1) - counts[i] for i in members}
        candidates = [
            (float(scores[i][u]), i, int(u)) for i in members for u in keeps[i].nonzero().squeeze(1)
        ]
        for _, i, _ in sorted(candidates):
            if need == 0:
                break
            if room[i] > 0:
                counts[i] += 1
                room[i] -= 1
                need -= 1
    return [
        max(int((~k).sum()), g.num_units - clamp_kept(g, g.num_units - c))
        for g, k, c in zip(groups, keeps, counts, strict=True)
    ]


def pruning_steps(prune_every: int, start: float, last: int) -> tuple[int, ...]:
    """The optimizer steps after which masks grow: every ``prune_every`` steps past ``start`` (the
    warm-up), and ``last``, the step that reaches the target."""
    return tuple(sorted({t for t in range(prune_every, last, prune_every) if t > start} | {last}))


def cubic_ratio(
    step: int,
    total_steps: int,
    final_ratio: float,
    initial_ratio: float = 0.0,
    warmup: float = 0.1,
    cooldown: float = 0.1,
) -> float:
    """The cubic schedule ``r(t) = r_f + (r_i − r_f)(1 − (t − wT)/(T − (w+c)T))³``.

    ``initial_ratio`` before ``wT``, ``final_ratio`` from ``T − cT`` on.
    """
    start, end = warmup * total_steps, total_steps - cooldown * total_steps
    return cubic_ratio_between(step, start, end, final_ratio, initial_ratio)


def cubic_ratio_between(
    step: float, start: float, end: float, final_ratio: float, initial_ratio: float = 0.0
) -> float:
    """The cubic schedule between steps ``start`` and ``end``: ``initial_ratio`` up to ``start``,
    ``final_ratio`` from ``end`` on (:func:`cubic_ratio` with ``start = wT``, ``end = T − cT``)."""
    if step <= start:
        return initial_ratio
    if step >= end:
        return final_ratio
    progress = (step - start) / (end - start)
    return final_ratio + (initial_ratio - final_ratio) * (1.0 - progress) ** 3
