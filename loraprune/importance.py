"""Importance criteria and their moving average per structure group.

Every criterion produces, for each member matrix of a group, an importance vector along the
member's pruned axis; :func:`loraprune.ops.score_update` then L2-normalises each vector, folds
it into the group's units and moves the running scores.

- ``lora`` (LoRAPrune): ``|G ⊙ (W + s·B·A)|`` with ``G = gB·A + B·gA − gB·gA`` estimated from
  the LoRA factors and their gradients: the gradient of ``W`` is never formed.
- ``taylor`` (LLM-Pruner, first order): ``|∂L/∂W ⊙ (W + s·B·A)|`` from the frozen weights'
  real gradients: memory-hungry by design (one full-size gradient per matrix).
- ``magnitude``: ``(W + s·B·A)²``: the squared L2 norm of each row / column.
- ``random``: fixed seeded scores.
"""

from __future__ import annotations

import torch
from torch import nn

from loraprune import ops
from loraprune.config import LoraPruneConfig
from loraprune.nn import LoraPruneLinear
from loraprune.structures import Member, StructureGroup


def merged_weight(module: LoraPruneLinear) -> torch.Tensor:
    """``W + s·B·A`` in float32 (full size: used by the baselines only)."""
    weight = module.weight.float()
    if module.lora_A is not None:
        weight = weight + module.scaling * (module.lora_B.float() @ module.lora_A.float())
    return weight


def reduce_axis(element: torch.Tensor, axis: str) -> torch.Tensor:
    return element.sum(dim=1) if axis == "out" else element.sum(dim=0)


class ImportanceTracker:
    """Running importance scores of every structure group of a model.

    Call :meth:`update` after each backward pass (with unscaled gradients), before the
    optimizer zeroes them. Scores, update and skip counters live on the model's device.
    """

    def __init__(self, model: nn.Module, groups: list[StructureGroup], config: LoraPruneConfig) -> None:
        self.model = model
        self.groups = groups
        self.criterion = config.criterion
        self.decay = config.ema_decay
        self.squared = config.squared
        device = next(model.parameters()).device
        self.scores = [torch.zeros(g.num_units, dtype=torch.float32, device=device) for g in groups]
        self.num_updates = [torch.zeros((), dtype=torch.int64, device=device) for _ in groups]
        self.num_skipped = [torch.zeros((), dtype=torch.int64, device=device) for _ in groups]
        if self.criterion == "lora":
            for group in groups:
                if not any(self._module(m).lora_A is not None for m in group.members):
                    raise ValueError(
                        f"criterion 'lora' needs LoRA on at least one matrix of {group.name}; "
                        "add its projections to target_modules"
                    )
        if self.criterion == "random":
            generator = torch.Generator().manual_seed(config.seed)
            for scores, counter in zip(self.scores, self.num_updates, strict=True):
                scores.copy_(torch.rand(scores.shape, generator=generator))
                counter.fill_(1)

    @property
    def needs_weight_grad(self) -> bool:
        """Whether the frozen weights must receive gradients during backward (``taylor``)."""
        return self.criterion == "taylor"

    def _module(self, member: Member) -> LoraPruneLinear:
        return self.model.get_submodule(member.path)

    @torch.no_grad()
    def update(self) -> None:
        """Fold this step's importance into the running scores (no-op for ``random``)."""
        if self.criterion == "random":
            return
        for group, scores, updates, skipped in zip(
            self.groups, self.scores, self.num_updates, self.num_skipped, strict=True
        ):
            parts = [v for m in group.members if (v := self.member_importance(m)) is not None]
            ops.score_update(scores, parts, self.decay, updates, skipped)

    def member_importance(self, member: Member) -> torch.Tensor | None:
        """One member's importance vector along its pruned axis (``None``: no LoRA to estimate from)."""
        module = self._module(member)
        if self.criterion == "lora":
            if module.lora_A is None:
                return None
            if module.lora_A.grad is None or module.lora_B.grad is None:
                raise RuntimeError(
                    f"{member.path}: LoRA factors have no gradient; call update() after "
                    "backward() and before zero_grad()"
                )
            rows, cols = ops.lora_importance(
                module.weight,
                module.lora_A,
                module.lora_B,
                module.lora_A.grad,
                module.lora_B.grad,
                module.scaling,
                squared=self.squared,
            )
            return rows if member.axis == "out" else cols
        if self.criterion == "taylor":
            if module.weight.grad is None:
                raise RuntimeError(
                    f"{member.path}: the frozen weight has no gradient; the taylor criterion "
                    "needs weight.requires_grad during backward (LoraPruner sets it)"
                )
            element = module.weight.grad.float() * merged_weight(module)
            element = element.square() if self.squared else element.abs()
            return reduce_axis(element, member.axis)
        return reduce_axis(merged_weight(module).square(), member.axis)  # magnitude

    def num_applied_updates(self) -> int:
        """The fewest updates any group has received (synchronises with the device)."""
        return min(int(c) for c in self.num_updates) if self.num_updates else 0

    def total_skipped(self) -> int:
        """Group updates skipped for NaN/Inf so far, summed over groups (synchronises)."""
        return sum(int(c) for c in self.num_skipped)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for group, scores, updates, skipped in zip(
            self.groups, self.scores, self.num_updates, self.num_skipped, strict=True
        ):
            state[f"{group.name}.scores"] = scores
            state[f"{group.name}.num_updates"] = updates
            state[f"{group.name}.num_skipped"] = skipped
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for group, scores, updates, skipped in zip(
            self.groups, self.scores, self.num_updates, self.num_skipped, strict=True
        ):
            for name, tensor in (("scores", scores), ("num_updates", updates), ("num_skipped", skipped)):
                key = f"{group.name}.{name}"
                if key not in state or state[key].shape != tensor.shape:
                    raise ValueError(f"importance state: {key} is missing or has the wrong shape")
                tensor.copy_(state[key])
