"""The pruning API: track importance during LoRA fine-tuning, grow masks, compact."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from loraprune.compaction import compact
from loraprune.config import LoraPruneConfig, check_ratio
from loraprune.importance import ImportanceTracker
from loraprune.lora_rank import RankPruner
from loraprune.masks import global_prune_counts, grow_mask, prune_count
from loraprune.nn import LoraPruneLinear, lora_modules, lora_parameters, patch_model
from loraprune.quantization import QuantizedLoraPruneLinear
from loraprune.structures import StructureGroup, build_groups


@dataclass(frozen=True)
class GroupStatus:
    name: str
    kind: str
    kept: int
    total: int


class LoraPruner:
    """Prunes a Hugging Face causal LM's heads and MLP channels, guided by importance.

    Typical loop::

        pruner = LoraPruner(model, LoraPruneConfig(ratio=0.5))
        optimizer = torch.optim.AdamW(pruner.trainable_parameters(), lr=1e-4)
        for step, batch in enumerate(batches, 1):
            model(**batch).loss.backward()
            pruner.update_scores()            # before the optimizer zeroes the gradients
            optimizer.step(); model.zero_grad()
            if step % 10 == 0:
                pruner.prune(schedule(step))  # masks only grow
        model = pruner.compact()              # dense, smaller, LoRA merged

    With ``LoraPruneConfig(lora_r=64, lora_final_r=8)`` (PrunedLoRA) also call
    ``pruner.update_rank_scores()`` beside ``update_scores()`` and, on the rank schedule
    (:func:`loraprune.lora_rank.rank_schedule`), ``pruner.prune_rank(2, optimizer)`` after the
    optimizer step (``prune_rank(None, optimizer)``: down to the final rank).

    The model is patched in place (see :func:`loraprune.nn.patch_model`).
    """

    def __init__(self, model: nn.Module, config: LoraPruneConfig | None = None) -> None:
        self.model = patch_model(model, config)
        self.config = config or LoraPruneConfig()
        self.groups: list[StructureGroup] = build_groups(self.model, self.config)
        self.tracker = ImportanceTracker(self.model, self.groups, self.config)
        self.keep = [torch.ones(g.num_units, dtype=torch.bool) for g in self.groups]
        # Knowledge-distribution protection (:meth:`protect`): units never chosen, and groups left whole.
        self.protected: list[torch.Tensor] | None = None
        self.exempt: list[bool] = [False] * len(self.groups)
        self.rank: RankPruner | None = None  # PrunedLoRA: the adapters' rank shrinks (lora_final_r)
        if self.config.lora_final_r is not None:
            self.rank = RankPruner(
                self.model, self.config.lora_final_r, self.config.lora_alpha_mode, self.config.ema_decay
            )
        if self.tracker.needs_weight_grad:
            for group in self.groups:
                for member in group.members:
                    self.model.get_submodule(member.path).weight.requires_grad_(True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return lora_parameters(self.model)

    def update_scores(self) -> None:
        """Fold the current gradients into the running importance (after backward, before zero_grad)."""
        self.tracker.update()

    def update_rank_scores(self) -> None:
        """Fold the current gradients into the rank components' running importance (with
        ``lora_final_r``; after backward, before zero_grad)."""
        self._rank_pruner().update()

    def prune_rank(self, count: int | None = None, optimizer: torch.optim.Optimizer | None = None) -> int:
        """Remove each adapter's ``count`` lowest-scored rank components (``None``: down to
        ``lora_final_r``); pass the optimizer so that its state is narrowed with the factors.
        Returns the number of components removed."""
        return self._rank_pruner().prune(count, optimizer)

    def _rank_pruner(self) -> RankPruner:
        if self.rank is None:
            raise RuntimeError("rank pruning needs LoraPruneConfig(lora_final_r=...)")
        return self.rank

    def prune(self, ratio: float | None = None) -> None:
        """Grow the masks to ``ratio`` (default: the config's target) of each group's units."""
        for i, keep in enumerate(self.choose(ratio)):
            if not torch.equal(keep, self.keep[i]):
                self.set_group_mask(i, keep)

    def choose(
        self, ratio: float | None = None, keep: list[torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """The keep-masks :meth:`prune` would set: ``keep`` (default: the current masks) grown to
        ``ratio`` of each group's units by the scores; nothing is applied (a fade applies them later,
        :mod:`loraprune.fade`). Protected units are never chosen and exempt groups lose none."""
        ratio = self.config.ratio if ratio is None else check_ratio(ratio, "ratio")
        keeps = self.keep if keep is None else keep
        if ratio > 0 and self.tracker.num_applied_updates() == 0:
            raise RuntimeError(
                "no importance scores yet: call update_scores() after a backward pass before prune()"
            )
        self.tracker.refresh()
        scores = [s.detach().float().cpu() for s in self.tracker.scores]
        if self.protected is not None:  # ranked last: chosen only if nothing else is left (checked below)
            scores = [s.masked_fill(p, float("inf")) for s, p in zip(scores, self.protected, strict=True)]
        active = [i for i in range(len(self.groups)) if not self.exempt[i]]
        targets = [0] * len(self.groups)
        if self.config.ranking == "global":
            counts = global_prune_counts(
                [self.groups[i] for i in active],
                [scores[i] for i in active],
                [keeps[i] for i in active],
                ratio,
            )
            for i, count in zip(active, counts, strict=True):
                targets[i] = count
        else:
            for i in active:
                targets[i] = prune_count(self.groups[i], ratio)
        chosen = [
            grow_mask(keeps[i], scores[i], targets[i], group.blocks) for i, group in enumerate(self.groups)
        ]
        if self.protected is not None:
            for group, new, protected in zip(self.groups, chosen, self.protected, strict=True):
                if bool((protected & ~new).any()):
                    raise RuntimeError(
                        f"{group.name}: ratio {ratio:g} had to choose a protected unit (protect_fraction "
                        "leaves too few units to prune)"
                    )
        return chosen

    def protect(self, protected: list[torch.Tensor], exempt: list[bool] | None = None) -> None:
        """Units never chosen (bool per unit and group) and groups that lose none (``exempt``), from the
        knowledge-distribution analysis (:mod:`loraprune.protect`, whose ``check_reachable`` says whether
        the config's ratio can still be reached; :meth:`choose` raises where it cannot)."""
        exempt = [False] * len(self.groups) if exempt is None else [bool(e) for e in exempt]
        if len(protected) != len(self.groups) or len(exempt) != len(self.groups):
            raise ValueError(f"protect: expected one entry per group ({len(self.groups)})")
        for group, mask in zip(self.groups, protected, strict=True):
            if mask.dtype != torch.bool or mask.shape != (group.num_units,):
                raise ValueError(f"protect: {group.name} needs a bool tensor of shape ({group.num_units},)")
        masks = [m.cpu().clone() for m in protected]
        for group, keep, mask in zip(self.groups, self.keep, masks, strict=True):
            if bool((mask & ~keep).any()):
                raise ValueError(f"protect: {group.name} has a protected unit that is already masked")
        self.protected, self.exempt = masks, exempt

    def set_group_mask(self, index: int, keep: torch.Tensor) -> None:
        """Apply a unit keep-mask to every member matrix of group ``index``."""
        group = self.groups[index]
        if keep.dtype != torch.bool or keep.shape != (group.num_units,):
            raise ValueError(f"keep must be a bool tensor of shape ({group.num_units},) for {group.name}")
        self.keep[index] = keep.clone()
        for member in group.members:
            module: LoraPruneLinear = self.model.get_submodule(member.path)
            size = module.out_features if member.axis == "out" else module.in_features
            mask = keep.repeat_interleave(size // group.num_units).to(module.out_mask.device)
            module.set_masks(**{f"{member.axis}_mask": mask})

    def finish_scoring(self) -> None:
        """Scores are no longer needed: stop the backward hooks and the frozen weights' gradients
        (``taylor`` materialized) to free memory."""
        self.tracker.stop_capture()
        if self.tracker.needs_weight_grad:
            for group in self.groups:
                for member in group.members:
                    module = self.model.get_submodule(member.path)
                    module.weight.requires_grad_(False)
                    module.weight.grad = None

    def masked_anything(self) -> bool:
        return any(not bool(k.all()) for k in self.keep)

    def status(self) -> list[GroupStatus]:
        return [
            GroupStatus(g.name, g.kind, int(k.sum()), g.num_units)
            for g, k in zip(self.groups, self.keep, strict=True)
        ]

    def masked_fractions(self, ratio: float | None = None) -> dict[str, float]:
        """Fraction of the pruned layers' units masked per kind (``attention``, ``mlp``): now, or
        what the exact per-layer counts reach at ``ratio`` (with 3 KV groups a layer, 0.5 masks 2) over
        the groups the ratio applies to (not those :meth:`protect` exempts)."""
        totals: dict[str, list[int]] = {}
        for group, keep, exempt in zip(self.groups, self.keep, self.exempt, strict=True):
            if ratio is not None and exempt:
                continue  # left whole by protection: not among the groups the ratio applies to
            masked = int((~keep).sum()) if ratio is None else prune_count(group, ratio)
            total = totals.setdefault(group.kind, [0, 0])
            total[0] += masked
            total[1] += group.num_units
        return {kind: masked / units for kind, (masked, units) in totals.items()}

    def unreachable_ratio_notes(self, tolerance: float = 0.05) -> list[str]:
        """One line per kind whose exact per-layer counts miss the config's ratio by more than
        ``tolerance``, naming the unit counts (e.g. ``--gqa-unit kv_group`` with few KV groups)."""
        ratio, notes = self.config.ratio, []
        for kind, reached in self.masked_fractions(ratio).items():
            if abs(reached - ratio) <= tolerance:
                continue
            counts = sorted(
                {
                    (g.num_units, prune_count(g, ratio))
                    for g, exempt in zip(self.groups, self.exempt, strict=True)
                    if g.kind == kind and not exempt
                }
            )
            per_layer = ", ".join(f"{masked} of {units}" for units, masked in counts)
            notes.append(
                f"ratio {ratio:g} masks {reached:.1%} of the {kind} units: each pruned layer loses "
                f"{per_layer} (floor(ratio·n + 1/2) per layer, at least one kept)"
            )
        return notes

    def parameter_counts(self) -> tuple[int, int]:
        """(dense, kept) parameter counts of the base model, LoRA factors excluded."""
        return count_parameters(self.model)

    def compact(self) -> nn.Module:
        """Remove masked structures and merge LoRA (see :func:`loraprune.compaction.compact`)."""
        return compact(self.model)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Masks and importance state (LoRA factors live in the model's own state dict)."""
        state = {f"{g.name}.keep": k for g, k in zip(self.groups, self.keep, strict=True)}
        if self.protected is not None:
            for group, protected, exempt in zip(self.groups, self.protected, self.exempt, strict=True):
                state[f"{group.name}.protected"] = protected
                state[f"{group.name}.exempt"] = torch.tensor(exempt)
        state.update(self.tracker.state_dict())
        if self.rank is not None:
            state.update({f"lora_rank.{k}": v for k, v in self.rank.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore masks, scores and, with rank pruning, each adapter's rank (narrowed to the saved
        components: restore the LoRA factors' values after this)."""
        self.tracker.load_state_dict(state)
        if self.rank is not None:
            self.rank.load_state_dict(
                {k.removeprefix("lora_rank."): v for k, v in state.items() if k.startswith("lora_rank.")}
            )
        for i, group in enumerate(self.groups):
            keep = state.get(f"{group.name}.keep")
            if keep is None:
                raise ValueError(f"pruner state: {group.name}.keep is missing")
            self.set_group_mask(i, keep.cpu())
        if any(f"{g.name}.protected" in state for g in self.groups):
            self.protected = [state[f"{g.name}.protected"].cpu().clone() for g in self.groups]
            self.exempt = [bool(state[f"{g.name}.exempt"]) for g in self.groups]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(dense, kept) parameter counts, LoRA factors excluded; kept counts honour the masks."""
    patched = lora_modules(model)
    # Projection weights count by their logical size (a quantized base stores packed codes).
    skipped = {id(p) for m in patched.values() if m.lora_A is not None for p in (m.lora_A, m.lora_B)}
    for module in patched.values():
        weights = (
            module.base.parameters() if isinstance(module, QuantizedLoraPruneLinear) else [module.weight]
        )
        skipped.update(id(p) for p in weights)
    dense = kept = sum(p.numel() for p in model.parameters() if id(p) not in skipped)
    for module in patched.values():
        rows, cols = int(module.out_mask.sum()), int(module.in_mask.sum())
        dense += module.out_features * module.in_features
        kept += rows * cols
        if module.bias is not None:
            kept -= module.out_features - rows
    return dense, kept
