"""PrunedLoRA: adapters start over-parameterised and lose rank components while they train.

Xie et al. 2025 (PrunedLoRA, arXiv 2510.00192) start LoRA at a high rank ``r0`` and prune rank
components during fine-tuning, never reactivating them. Here that keeps the LoRA-guided estimate
(and the fine-tuning) at a high rank while the early, irreversible structure decisions are made,
and holds rank ``r`` afterwards.

- A rank component ``k`` of an adapter is row ``k`` of ``A`` with column ``k`` of ``B``.
- Its importance is the first-order change of the loss when it is removed, from the gradients
  the step computes anyway: ``|Σᵢ (∂L/∂B)ᵢₖ Bᵢₖ + Σⱼ (∂L/∂A)ₖⱼ Aₖⱼ|``. Both sums equal
  ``s·B_{:,k}ᵀ (∂L/∂W) A_{k,:}ᵀ`` (dropout included), so the score is twice the first-order loss
  change of zeroing the component. It is moving-averaged as the structure scores are (from zero; a step
  with NaN/Inf is skipped). The paper derives a Hessian-informed (second-order) mask with a
  recovery update of the kept components; this module implements the first-order gradient
  score above, without a recovery update.
- Every ``K1`` steps each adapter loses its ``K2`` lowest-scored components (ties: the lower
  index goes first); the last event of the schedule removes whatever is left above ``r``.
- Removal narrows ``A``, ``B``, their gradients and the optimizer's per-parameter state
  (AdamW's ``exp_avg``, ``exp_avg_sq``) physically, so the run then holds rank ``r``.
- ``alpha_mode="rank"``: alpha ∝ rank, the scaling stays ``alpha / r0``; ``"fixed"``: alpha
  stays, the scaling becomes ``alpha / r_now``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from loraprune.importance import _moving_average
from loraprune.nn import LoraPruneLinear, lora_modules

PAPER_EVERY, PAPER_COUNT = 10, 2  # the paper's best schedule: K1 = 10 steps, K2 = 2 components


@dataclass(frozen=True)
class RankSchedule:
    """When adapters lose rank components: after each optimizer step in ``steps``, ``count``
    components per adapter, except the last, which prunes every adapter to ``final_r``."""

    initial_r: int
    final_r: int
    every: int
    count: int
    steps: tuple[int, ...]

    def to_dict(self) -> dict:
        return asdict(self)


def rank_schedule(
    steps: int,
    warmup: float,
    cooldown: float,
    initial_r: int,
    final_r: int,
    every: int | None = None,
    count: int | None = None,
) -> RankSchedule:
    """The removal steps of a run of ``steps`` optimizer steps.

    Removal runs over the window of the structure schedule, from the end of the warm-up
    (``floor(warmup·steps)``) to the first step of the cool-down (``ceil(steps − cooldown·steps)``),
    where the rank reaches ``final_r``. Unset ``every``/``count`` take the paper's K1 = 10,
    K2 = 2 where ``ceil((r0 − r)/2)`` events of 10 steps fit in that window; otherwise ``every``
    shrinks to fit (at least 1), and then ``count`` grows: ``ceil((r0 − r) / window)``. Events
    at ``start + j·every`` that are not needed, or not before the window's end, are dropped;
    if the given ones do not reach ``final_r`` by then, the window's last step removes the rest.
    """
    end = max(1, math.ceil(steps - cooldown * steps))
    start = min(math.floor(warmup * steps), end - 1)
    window = end - start
    to_remove = initial_r - final_r
    if to_remove <= 0:
        return RankSchedule(initial_r, final_r, every or PAPER_EVERY, count or PAPER_COUNT, ())
    if every is None:
        needed = math.ceil(to_remove / (count or PAPER_COUNT))
        every = max(1, min(PAPER_EVERY, window // needed))
    if count is None:
        slots = max(1, window // every)
        count = max(PAPER_COUNT, math.ceil(to_remove / slots))
    events: list[int] = []
    removed = 0
    for t in range(start + every, end, every):
        if removed >= to_remove:
            break
        events.append(t)
        removed += count
    if removed < to_remove:
        events.append(end)
    return RankSchedule(initial_r, final_r, every, count, tuple(events))


class RankPruner:
    """Rank-component scores of every adapter of a patched model, and their removal.

    Args:
        model: a model patched by :func:`loraprune.nn.patch_model`.
        final_r: the rank every adapter ends at (at most its rank now).
        alpha_mode: ``rank`` or ``fixed`` (see the module docstring).
        decay: λ of the scores' moving average.
    """

    def __init__(self, model: nn.Module, final_r: int, alpha_mode: str, decay: float) -> None:
        self.modules: dict[str, LoraPruneLinear] = {
            path: m for path, m in lora_modules(model).items() if m.lora_A is not None
        }
        if not self.modules:
            raise ValueError("lora_final_r: the model has no LoRA adapter to prune the rank of")
        for path, module in self.modules.items():
            if final_r > module.r:
                raise ValueError(
                    f"lora_final_r ({final_r}) exceeds the rank of {path}'s adapter ({module.r})"
                )
        self.final_r, self.alpha_mode, self.decay = final_r, alpha_mode, decay
        # alpha = scaling · r at the start: the reference both alpha modes derive the scaling from
        self.initial = {p: (m.r, m.scaling) for p, m in self.modules.items()}
        self.kept = {p: torch.arange(m.r) for p, m in self.modules.items()}  # original indices
        self.scores = {
            p: torch.zeros(m.r, dtype=torch.float32, device=m.lora_A.device) for p, m in self.modules.items()
        }
        self.num_updates = {
            p: torch.zeros((), dtype=torch.int64, device=m.lora_A.device) for p, m in self.modules.items()
        }
        self.num_skipped = {p: torch.zeros_like(c) for p, c in self.num_updates.items()}

    @property
    def initial_r(self) -> int:
        return max(r for r, _ in self.initial.values())

    def ranks(self) -> dict[str, int]:
        return {p: m.r for p, m in self.modules.items()}

    def finished(self) -> bool:
        return all(m.r <= self.final_r for m in self.modules.values())

    @staticmethod
    def component_importance(module: LoraPruneLinear) -> torch.Tensor:
        """``|Σᵢ gB_ik B_ik + Σⱼ gA_kj A_kj|`` per rank component (fp32), from the factors' gradients."""
        grad_a, grad_b = module.lora_A.grad, module.lora_B.grad
        if grad_a is None or grad_b is None:
            raise RuntimeError(
                "LoRA factors have no gradient; score the rank components after backward() and "
                "before zero_grad()"
            )
        by_b = (grad_b.float() * module.lora_B.float()).sum(dim=0)
        by_a = (grad_a.float() * module.lora_A.float()).sum(dim=1)
        return (by_b + by_a).abs()

    @torch.no_grad()
    def update(self) -> None:
        """Fold this step's component importance into the running scores (after backward)."""
        for path, module in self.modules.items():
            if module.r <= self.final_r:
                continue  # done: nothing left to choose
            now = self.component_importance(module)
            _moving_average(
                self.scores[path], now, self.decay, self.num_updates[path], self.num_skipped[path]
            )

    def scaling_at(self, path: str, rank: int) -> float:
        initial_r, initial_scaling = self.initial[path]
        if self.alpha_mode == "rank":
            return initial_scaling
        return initial_scaling * initial_r / rank  # alpha / rank with alpha = initial scaling · r0

    @torch.no_grad()
    def prune(self, count: int | None = None, optimizer: torch.optim.Optimizer | None = None) -> int:
        """Remove the ``count`` lowest-scored components of every adapter (``None``: down to the
        final rank), never below it; narrows ``optimizer``'s state of the factors. Returns the
        number of components removed in all."""
        removed = 0
        for path, module in self.modules.items():
            target = self.final_r if count is None else max(self.final_r, module.r - count)
            if target >= module.r:
                continue
            if int(self.num_updates[path]) == 0:
                raise RuntimeError(
                    f"{path}: no rank-component scores yet: call update_rank_scores() after a backward "
                    "pass before prune_rank()"
                )
            order = torch.sort(self.scores[path].cpu(), stable=True).indices  # lowest first
            keep = order[module.r - target :].sort().values
            removed += module.r - target
            self._narrow(path, module, keep, optimizer)
        return removed

    def _narrow(
        self, path: str, module: LoraPruneLinear, keep: torch.Tensor, optimizer: torch.optim.Optimizer | None
    ) -> None:
        if optimizer is not None:
            for param, axis in ((module.lora_A, 0), (module.lora_B, 1)):
                state = optimizer.state.get(param, {})
                for name, value in state.items():
                    if torch.is_tensor(value) and value.shape == param.shape:
                        state[name] = value.index_select(axis, keep.to(value.device))
        module.keep_rank_components(keep, self.scaling_at(path, len(keep)))
        self.kept[path] = self.kept[path][keep]
        self.scores[path] = self.scores[path].index_select(0, keep.to(self.scores[path].device))

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for path in self.modules:
            state[f"{path}.kept"] = self.kept[path]
            state[f"{path}.scores"] = self.scores[path]
            state[f"{path}.num_updates"] = self.num_updates[path]
            state[f"{path}.num_skipped"] = self.num_skipped[path]
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore scores and narrow every adapter to the saved components (the factors' values
        are the caller's to restore; the optimizer's state is loaded at the saved shapes)."""
        for path, module in self.modules.items():
            keys = [f"{path}.{name}" for name in ("kept", "scores", "num_updates", "num_skipped")]
            missing = [k for k in keys if k not in state]
            if missing:
                raise ValueError(f"rank state: {missing[0]} is missing")
            kept = state[keys[0]].cpu().long()
            positions = torch.searchsorted(self.kept[path], kept)
            if positions.numel() == 0 or not torch.equal(
                self.kept[path][positions.clamp(max=len(self.kept[path]) - 1)], kept
            ):
                raise ValueError(f"rank state: {keys[0]} names components this adapter no longer has")
            if len(kept) < module.r:
                self._narrow(path, module, positions, None)
            if state[keys[1]].shape != self.scores[path].shape:
                raise ValueError(f"rank state: {keys[1]} has the wrong shape")
            self.scores[path].copy_(state[keys[1]])
            self.num_updates[path].copy_(state[keys[2]])
            self.num_skipped[path].copy_(state[keys[3]])

    def total_skipped(self) -> int:
        return sum(int(c) for c in self.num_skipped.values())


__all__ = ["PAPER_COUNT", "PAPER_EVERY", "RankPruner", "RankSchedule", "rank_schedule"]
