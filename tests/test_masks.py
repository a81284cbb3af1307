"""Mask counts, ranking and schedule: exact ratios, monotone masks, GQA blocks, round_to."""

from __future__ import annotations

import itertools

import pytest
import torch

from loraprune.masks import clamp_kept, cubic_ratio, global_prune_counts, grow_mask, prune_count
from loraprune.structures import StructureGroup


def group(n: int, blocks: int = 1, round_to: int = 1, kind: str = "mlp", layer: int = 0) -> StructureGroup:
    return StructureGroup(layer, kind, n, (), blocks=blocks, round_to=round_to)


@pytest.mark.parametrize(
    ("n", "ratio", "pruned"),
    [
        (32, 0.5, 16),
        (6, 0.5, 3),
        (6, 0.2, 1),
        (11008, 0.5, 5504),
        (11008, 0.2, 2202),
        (7, 0.5, 4),
        (4, 0.0, 0),
        (6, 0.95, 5),
    ],
)
def test_prune_count_is_exact(n, ratio, pruned):
    assert prune_count(group(n), ratio) == pruned  # 0.95 of 6 keeps one unit


def test_prune_count_with_blocks_and_round_to():
    assert prune_count(group(32, blocks=8), 0.5) == 16  # 2 of 4 query heads in each of 8 KV groups
    assert prune_count(group(12, blocks=4), 0.3) == 4  # round(0.9) = 1 per block
    assert prune_count(group(11008, round_to=64), 0.5) == 11008 - 5504  # 5504 = 86·64
    assert (11008 - prune_count(group(11008, round_to=64), 0.3)) % 64 == 0
    assert prune_count(group(100, round_to=64), 0.0) == 0  # nothing to prune keeps everything
    assert clamp_kept(group(100, round_to=64), 1) == 64


def test_grow_mask_takes_lowest_scores_and_never_unmasks():
    scores = torch.tensor([5.0, 1.0, 3.0, 0.5, 4.0, 2.0])
    keep = grow_mask(torch.ones(6, dtype=torch.bool), scores, 2)
    assert keep.tolist() == [True, False, True, False, True, True]
    # scores change: a masked unit with a high score stays masked, the next lowest kept unit goes
    keep = grow_mask(keep, torch.tensor([5.0, 9.0, 3.0, 9.0, 4.0, 2.0]), 3)
    assert keep.tolist() == [True, False, True, False, True, False]
    assert torch.equal(grow_mask(keep, scores, 1), keep)


def test_grow_mask_per_block_and_ties():
    scores = torch.tensor([1.0, 1.0, 2.0, 3.0, 3.0, 0.5])
    keep = grow_mask(torch.ones(6, dtype=torch.bool), scores, 4, blocks=2)
    assert keep.tolist() == [False, False, True, False, True, False]  # two per block, ties to lower index


def test_global_counts_keep_the_total_and_the_minimum():
    groups = [group(8, layer=0), group(8, layer=1), group(8, layer=2)]
    scores = [torch.arange(8.0) + 100, torch.arange(8.0), torch.arange(8.0) + 50]
    keeps = [torch.ones(8, dtype=torch.bool) for _ in groups]
    counts = global_prune_counts(groups, scores, keeps, 0.5)
    assert sum(counts) == 12 and counts == [0, 7, 5]  # layer 1 keeps one unit at least
    keeps[0][0] = False  # already masked units count towards the target and stay masked
    assert global_prune_counts(groups, scores, keeps, 0.5)[0] >= 1


def test_cubic_schedule():
    assert cubic_ratio(0, 100, 0.5) == 0.0 and cubic_ratio(10, 100, 0.5) == 0.0
    assert cubic_ratio(90, 100, 0.5) == 0.5 and cubic_ratio(100, 100, 0.5) == 0.5
    values = [cubic_ratio(t, 100, 0.5) for t in range(101)]
    assert all(a <= b for a, b in itertools.pairwise(values))
    assert cubic_ratio(50, 100, 0.5) == pytest.approx(0.5 - 0.5 * 0.5**3)
