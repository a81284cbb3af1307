"""LoRAShear's knowledge distribution analysis: protect the most damaging fraction γ of the structures
before pruning starts (``protect_fraction``, ``protect_by``).

LoRAShear (Chen et al. 2023, arXiv 2310.18356) measures, on a held-out set, how much the loss rises when
each minimally removable structure is removed from the unpruned model, and marks the fraction γ whose
removal hurts most as unprunable (it found the first and last ones most sensitive: LoRAPrune and LLM-Pruner
skip the first and last layers by hand for the same reason). Here, on ``heldout_windows`` windows held out
of ``--data`` (never trained on), with the LoRA factors as they start:

- ``protect_by="layer"`` (the cheap proxy, default): each group (one layer's attention units, one layer's
  MLP channels) is removed whole, two held-out passes per layer; per kind (attention, MLP) the
  ``round(γ·groups)`` groups whose removal raised the loss most are left whole (exempt: the ratio applies to
  the other groups, as to layers outside ``layers``).
- ``protect_by="unit"``: each unit (a KV group or query head, an MLP channel) is removed alone, one
  held-out pass per unit (the paper's granularity; the cost grows with the MLP width: 46,080 passes for
  SmolLM2-135M's 30 × 1,536 channels); per kind the ``round(γ·units)`` most damaging units are never chosen.
  With ``ranking="local"`` a layer keeps its exact count, so a layer whose protected units leave fewer than
  its target to choose from is refused before pruning starts (``ranking="global"`` only needs enough in all).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from loraprune.masks import clamp_kept, prune_count, round_half_up
from loraprune.nn import eval_mode

PROTECT_BY = ("layer", "unit")
DEFAULT_HELDOUT_WINDOWS = 16


def protect_options(fraction: float, by: str | None) -> str | None:
    """The checked ``protect_by`` (``layer`` with ``protect_fraction > 0``; setting it without is an error)."""
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, (int, float))
        or not (math.isfinite(fraction) and 0.0 <= fraction < 1.0)
    ):
        raise ValueError(f"protect_fraction must be in [0, 1), got {fraction!r}")
    if fraction == 0:
        if by is not None:
            raise ValueError("protect_by needs protect_fraction > 0 (the protection is off)")
        return None
    by = PROTECT_BY[0] if by is None else by
    if by not in PROTECT_BY:
        raise ValueError(f"protect_by must be one of {PROTECT_BY}, got {by!r}")
    return by


def heldout_split(
    windows: torch.Tensor, count: int, seed: int, name: str = "data"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(training, held-out)`` windows: ``count`` drawn by ``seed`` are held out, the rest keep their order."""
    if count >= len(windows):
        raise ValueError(
            f"heldout_windows ({count}) leaves no training window in {name} ({len(windows)} windows of this "
            "seq_len)"
        )
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed + 7_919))
    held = torch.zeros(len(windows), dtype=torch.bool)
    held[order[:count]] = True
    return windows[~held], windows[held]


@torch.no_grad()
def heldout_loss(
    model: nn.Module, windows: torch.Tensor, batch_size: int, amp_dtype: torch.dtype | None = None
) -> float:
    """Mean next-token cross-entropy over ``windows`` (eval mode, every module's mode restored)."""
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    with eval_mode(model):
        for first in range(0, len(windows), batch_size):
            batch = windows[first : first + batch_size].to(device)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss = model(input_ids=batch, labels=batch).loss
            count = batch[:, 1:].numel()
            total += float(loss) * count
            tokens += count
    return total / tokens


@dataclass
class Protection:
    """What the analysis measured and protected (per group, in the pruner's group order)."""

    fraction: float
    by: str
    heldout_windows: int
    base_loss: float  # held-out loss of the unpruned model
    increases: list[list[float]]  # per group: the loss increase of removing it whole, or per unit
    protected: list[list[int]]  # per group: protected unit indices
    exempt: list[bool]  # per group: left whole (protect_by "layer")
    # the analysis' cost, beside the run's training tokens: held-out forward passes (the unpruned model's
    # included), the tokens they scored, and their wall time
    passes: int = 0
    tokens: int = 0
    wall_time_s: float = 0.0

    def masks(self, groups) -> list[torch.Tensor]:
        masks = []
        for group, units in zip(groups, self.protected, strict=True):
            mask = torch.zeros(group.num_units, dtype=torch.bool)
            mask[units] = True
            masks.append(mask)
        return masks

    def to_dict(self, groups) -> dict:
        report = asdict(self)
        del report["increases"], report["protected"], report["exempt"]
        report["groups"] = [  # exempt: left whole (by layer); protected_units: never chosen (by unit)
            {
                "group": group.name,
                "loss_increase": increases[0] if self.by == "layer" else increases,
                "exempt": exempt,
                "protected_units": [] if self.by == "layer" else units,
            }
            for group, increases, units, exempt in zip(
                groups, self.increases, self.protected, self.exempt, strict=True
            )
        ]
        return report


@torch.no_grad()
def knowledge_distribution(
    pruner,
    windows: torch.Tensor,
    by: str,
    batch_size: int,
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> tuple[float, list[list[float]]]:
    """The held-out loss of the model as it is, and per group the loss increase of removing it whole
    (``by="layer"``: one value) or of removing each unit alone (``by="unit"``); the masks are restored."""
    base = heldout_loss(pruner.model, windows, batch_size, amp_dtype)
    passes = len(pruner.groups) if by == "layer" else sum(g.num_units for g in pruner.groups)
    bar = tqdm(total=passes, desc="knowledge distribution", unit="pass", disable=not progress, leave=False)
    increases = []
    try:
        for index, group in enumerate(pruner.groups):
            keep = pruner.keep[index].clone()
            trials = [torch.zeros_like(keep)] if by == "layer" else []
            if by == "unit":
                for unit in range(group.num_units):
                    trial = keep.clone()
                    trial[unit] = False
                    trials.append(trial)
            values = []
            try:
                for trial in trials:
                    pruner.set_group_mask(index, trial)
                    values.append(heldout_loss(pruner.model, windows, batch_size, amp_dtype) - base)
                    bar.update(1)
            finally:
                pruner.set_group_mask(index, keep)
            increases.append(values)
    finally:
        bar.close()
    return base, increases


def choose_protected(
    groups, increases: list[list[float]], fraction: float, by: str
) -> tuple[list[list[int]], list[bool]]:
    """Per kind, the ``round(γ·n)`` most damaging groups (``layer``) or units (``unit``): protected unit
    indices per group and the exempt groups. Ties go to the lower layer and unit."""
    protected: list[list[int]] = [[] for _ in groups]
    exempt = [False] * len(groups)
    for kind in dict.fromkeys(g.kind for g in groups):
        if by == "layer":
            members = [i for i, g in enumerate(groups) if g.kind == kind]
            ranked = sorted(members, key=lambda i: (-increases[i][0], i))
            for i in ranked[: round_half_up(fraction * len(members))]:
                exempt[i] = True
                protected[i] = list(range(groups[i].num_units))
        else:
            units = [(i, u) for i, g in enumerate(groups) if g.kind == kind for u in range(g.num_units)]
            ranked = sorted(units, key=lambda iu: (-increases[iu[0]][iu[1]], iu[0], iu[1]))
            for i, u in ranked[: round_half_up(fraction * len(units))]:
                protected[i].append(u)
            for units_of_group in protected:
                units_of_group.sort()
    return protected, exempt


def check_reachable(
    groups, protected: list[torch.Tensor], exempt: list[bool], ratio: float, ranking: str, fraction: float
) -> None:
    """Raise (naming ``protect_fraction``) unless the target at ``ratio`` can be chosen among the units
    left unprotected: per layer (and GQA block) with local ranking, per kind with global ranking."""
    if ratio == 0:
        return
    kinds = dict.fromkeys(g.kind for g in groups)
    for kind in kinds:
        members = [i for i, g in enumerate(groups) if g.kind == kind]
        if members and all(exempt[i] for i in members):
            raise ValueError(
                f"protect_fraction {fraction:g} protects every {kind} group ({len(members)}): nothing of that "
                "kind is left to prune; lower protect_fraction"
            )
        if ranking == "global":
            need = sum(prune_count(groups[i], ratio) for i in members if not exempt[i])
            room = sum(
                min(int((~protected[i]).sum()), groups[i].num_units - clamp_kept(groups[i], 1))
                for i in members
                if not exempt[i]
            )
            if need > room:
                raise ValueError(
                    f"protect_fraction {fraction:g} leaves {room} {kind} units to choose from, but ratio "
                    f"{ratio:g} masks {need}: unreachable; lower protect_fraction"
                )
            continue
        for i in members:
            if exempt[i]:
                continue
            group, target = groups[i], prune_count(groups[i], ratio)
            per_block = protected[i].view(group.blocks, -1)
            free = int((~per_block).sum(dim=1).min()) * group.blocks
            if target > free:
                raise ValueError(
                    f"protect_fraction {fraction:g} protects {int(protected[i].sum())} of the "
                    f"{group.num_units} units of {group.name}, whose target at ratio {ratio:g} masks "
                    f"{target}: unreachable with local ranking; lower protect_fraction, or rank all layers "
                    "together (ranking 'global')"
                )


__all__ = [
    "DEFAULT_HELDOUT_WINDOWS",
    "PROTECT_BY",
    "Protection",
    "check_reachable",
    "choose_protected",
    "heldout_loss",
    "heldout_split",
    "knowledge_distribution",
    "protect_options",
]
