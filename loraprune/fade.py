"""LoRAShear's LHSPG as a fade: a chosen unit's frozen base is driven to zero over ``fade_steps`` steps
while the LoRA factors keep training, then the unit is masked (``fade_steps``, ``fade_epsilon``).

LoRAShear (Chen et al. 2023, arXiv 2310.18356) does not mask a redundant group at once: its LoRA Half-Space
Projected Gradient (LHSPG) drives the group's variable to zero over a period while the LoRA factors keep
training, so that what the group carried moves into the groups that stay, and projects the group exactly
onto zero once an update crosses the half-space of its current direction. LoRA alone cannot cancel a
full-rank block of the frozen weight, so here the frozen base fades as well: while unit ``u`` fades, each of
its member slices (rows of q/k/v/gate/up with their bias, columns of o/down) computes

    x_u = m·W_u + s·(B·A)_u,     m = 1 − k/N on the k-th step after the unit was chosen (k = 1..N),

``N = fade_steps``; the LoRA factors train as usual. After the optimizer step the half-space test of HSPG
is made on the unit as one variable (all its member slices): with ``x`` the unit before the step and
``x̂`` after it (the new factors and the next ``m``), the unit is projected onto zero, i.e. masked, when

    ⟨x, x̂⟩ < ε·‖x‖²     (ε = fade_epsilon, default 0: the update reversed the unit's direction),

made while the next ``m`` is positive (at the N-th step ``m = 0`` leaves only the LoRA part, whose product
with ``x`` is about zero with the sign of its rounding). A unit that does not cross is masked after its N-th
step (its base is gone then, and the mask removes its LoRA part). Masked units are masked as without a
fade: they contribute exactly zero through the base and LoRA paths, and compaction is unchanged (it refuses
a model with a fade in progress).

Selection follows LoRAPrune's cubic schedule compressed by ``N``: units are chosen (by the criterion's
scores, among the units neither chosen nor protected) every ``prune_every`` steps past the warm-up and for
the last time ``N`` steps before the cool-down (:class:`~loraprune.run.PruneSchedule` with ``fade_steps``), so that the exact target count is
masked when the cool-down starts, as without a fade. In one-shot mode every unit is chosen after the
calibration and fades over the first ``N`` steps.

Kernels: the masked LoRA linear's kernels take 0/1 masks. The fade is applied outside them, exactly:
``LoraPruneLinear.set_fade`` leaves the kernels' call as it is and takes ``(1 − m)`` of the fading
features' base off the output with one GEMM over those features only (rows: ``x·W_Rᵀ + b_R``; columns:
``x_C·W_Cᵀ``, the slice gathered again in the backward rather than kept), so the fused Triton kernels keep
running and the extra work is proportional to the fading features. A quantized base (its forward is
unfused) scales the base's input columns and output rows.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING

import torch

from loraprune.nn import LoraPruneLinear
from loraprune.quantization import QuantizedLoraPruneLinear

if TYPE_CHECKING:  # run.py builds the schedule and imports this module
    from loraprune.run import PruneSchedule

DEFAULT_EPSILON = 0.0
# Elements of a member's slice (fp32) taken at once by the half-space test.
BLOCK_ELEMENTS = 1 << 22


def fade_options(steps: int, epsilon: float | None) -> float | None:
    """The checked ``fade_epsilon`` (``DEFAULT_EPSILON`` with a fade; setting it without one is an error)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"fade_steps must be an integer >= 0 (0: no fade), got {steps!r}")
    if steps == 0:
        if epsilon is not None:
            raise ValueError("fade_epsilon needs fade_steps > 0 (the fade is off)")
        return None
    epsilon = DEFAULT_EPSILON if epsilon is None else epsilon
    if (
        isinstance(epsilon, bool)
        or not isinstance(epsilon, (int, float))
        or not (math.isfinite(epsilon) and 0 <= epsilon < 1)
    ):
        raise ValueError(f"fade_epsilon must be in [0, 1), got {epsilon!r}")
    return float(epsilon)


def check_oneshot_fade(steps: int, fade_steps: int) -> None:
    """One-shot mode: the fade starts after the calibration and must end before the run does."""
    if fade_steps >= steps:
        raise ValueError(
            f"fade_steps ({fade_steps}) must be fewer than steps ({steps}): in oneshot mode every unit "
            "fades over the first fade_steps steps and the run must end masked"
        )


class Fader:
    """Chooses units as :meth:`LoraPruner.prune` would, fades them out and masks them (module docstring).

    Call :meth:`before_update` before the optimizer step (it keeps the factors the half-space test
    compares with) and :meth:`step_done` after it. Per group and unit the state is the step after which
    it was chosen (``start``, -1: not chosen), the step after which it was masked (``end``, -1: not yet)
    and whether the half-space projection masked it (before the N-th step).
    """

    def __init__(
        self, pruner, fade_steps: int, epsilon: float, schedule: PruneSchedule | None = None
    ) -> None:
        self.pruner, self.fade_steps, self.epsilon, self.schedule = pruner, fade_steps, epsilon, schedule
        sizes = [g.num_units for g in pruner.groups]
        self.start = [torch.full((n,), -1, dtype=torch.int64) for n in sizes]
        self.end = [torch.full((n,), -1, dtype=torch.int64) for n in sizes]
        self.projected = [torch.zeros(n, dtype=torch.bool) for n in sizes]
        self._snapshot: dict[str, tuple[torch.Tensor, torch.Tensor] | None] | None = None
        self._checked: dict[int, torch.Tensor] = {}
        self.selections: list[tuple[int, float]] = []  # (step, ratio) of every choice, for the report

    # -- state ---------------------------------------------------------------------------------------
    def fading(self, index: int) -> torch.Tensor:
        """Units of group ``index`` chosen and not masked yet."""
        return (self.start[index] >= 0) & (self.end[index] < 0)

    def any_fading(self) -> bool:
        return any(bool(self.fading(i).any()) for i in range(len(self.start)))

    def started(self) -> bool:
        return any(bool((s >= 0).any()) for s in self.start)

    def factor(self, start: torch.Tensor, steps_done: int) -> torch.Tensor:
        """``m`` of units chosen after step ``start`` for the optimizer step after ``steps_done``."""
        return (1.0 - (steps_done - start + 1).double() / self.fade_steps).clamp(min=0.0)

    # -- the loop's hooks ------------------------------------------------------------------------------
    def select(self, ratio: float, steps_done: int) -> None:
        """Choose units up to ``ratio`` (chosen ones count: they fade or are masked); they start fading."""
        chosen = self.pruner.choose(ratio, [s < 0 for s in self.start])
        for start, keep in zip(self.start, chosen, strict=True):
            start[(start < 0) & ~keep] = steps_done
        self.selections.append((steps_done, float(ratio)))
        self._agree()

    def before_update(self, steps_done: int) -> None:
        """Before the optimizer step after ``steps_done`` steps: keep the LoRA factors of the members of
        units the half-space test will look at after it: fading, and their next ``m`` still positive (where
        it reaches 0 only the LoRA part is left, ``⟨x, x̂⟩`` is about 0 with a sign of rounding, and the unit
        is masked after that step anyway)."""
        self._snapshot, self._checked = None, {}
        if self.fade_steps < 3:
            return
        step = steps_done + 1
        for i, start in enumerate(self.start):
            checked = (self.fading(i) & (start < step) & (step - start <= self.fade_steps - 2)).nonzero()
            if checked.numel():
                self._checked[i] = checked.squeeze(1)
        if not self._checked:
            return
        self._snapshot = {}
        for i in self._checked:
            for member in self.pruner.groups[i].members:
                module = self._module(member.path)
                self._snapshot[member.path] = (
                    None
                    if module.lora_A is None
                    else (module.lora_A.detach().clone(), module.lora_B.detach().clone())
                )

    def step_done(self, steps_done: int) -> None:
        """After optimizer step ``steps_done``: the half-space projection, the masks of units at the end
        of their fade, the schedule's next choice, and every fading unit's new ``m``."""
        masked = [torch.zeros(len(s), dtype=torch.bool) for s in self.start]
        if self._snapshot is not None:
            for i, units in self._checked.items():
                start = self.start[i][units]
                dot, norm = self._unit_products(
                    i, units, self.factor(start, steps_done - 1), self.factor(start, steps_done)
                )
                crossed = units[(norm > 0) & (dot < self.epsilon * norm)]
                masked[i][crossed] = True
                self.projected[i][crossed] = True
        self._snapshot, self._checked = None, {}
        for i, start in enumerate(self.start):
            masked[i] |= self.fading(i) & (steps_done - start >= self.fade_steps)
        if any(bool(m.any()) for m in masked):
            for i, newly in enumerate(masked):
                if newly.any():
                    self.end[i][newly] = steps_done
                    self.pruner.set_group_mask(i, self.pruner.keep[i] & ~newly)
            self._agree()
        schedule = self.schedule
        if schedule is not None and steps_done in schedule.prune_steps:
            self.select(schedule.ratio_after(steps_done, self.pruner.config.ratio), steps_done)
            if steps_done == schedule.prune_steps[-1]:
                self.pruner.finish_scoring()
        self.apply(steps_done)

    def apply(self, steps_done: int) -> None:
        """Hand every member layer its fading features' ``m`` for the step after ``steps_done``."""
        for i, group in enumerate(self.pruner.groups):
            fading = self.fading(i).nonzero().squeeze(1)
            factors = self.factor(self.start[i][fading], steps_done).float()
            for member in group.members:
                module = self._module(member.path)
                if not len(fading):
                    if module.fading:
                        module.set_fade(None, None)
                    continue
                size = module.out_features if member.axis == "out" else module.in_features
                width = size // group.num_units
                index = (fading[:, None] * width + torch.arange(width)).flatten()
                fade = (index, factors.repeat_interleave(width))
                module.set_fade(**({"out": fade} if member.axis == "out" else {"in_": fade}))

    # -- the half-space test ---------------------------------------------------------------------------
    @torch.no_grad()
    def _unit_products(
        self, index: int, units: torch.Tensor, before: torch.Tensor, after: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``⟨x, x̂⟩`` and ``‖x‖²`` per unit (fp64, CPU), ``x = m·W + s·B·A`` over all the unit's member
        slices (and bias rows) with the factors before the step and ``before``'s ``m``, ``x̂`` with the
        current factors and ``after``'s ``m``."""
        group = self.pruner.groups[index]
        dot = torch.zeros(len(units), dtype=torch.float64)
        norm = torch.zeros(len(units), dtype=torch.float64)
        for member in group.members:
            module = self._module(member.path)
            size, other = (
                (module.out_features, module.in_features)
                if member.axis == "out"
                else (module.in_features, module.out_features)
            )
            width = size // group.num_units
            device = module.out_mask.device
            old = self._snapshot.get(member.path)
            per_chunk = max(1, BLOCK_ELEMENTS // (width * other))
            whole = None
            if isinstance(module, QuantizedLoraPruneLinear) and member.axis == "in":  # one pass over W
                whole = _weight_slice(module, "in", _features(units, width, device))
            for first in range(0, len(units), per_chunk):
                chunk = slice(first, first + per_chunk)
                features = _features(units[chunk], width, device)
                weight = (
                    _weight_slice(module, member.axis, features)
                    if whole is None
                    else whole[first * width : first * width + len(features)]
                )
                m_before = before[chunk].float().to(device).repeat_interleave(width)[:, None]
                m_after = after[chunk].float().to(device).repeat_interleave(width)[:, None]
                x_before, x_after = m_before * weight, m_after * weight
                if old is not None:
                    x_before += module.scaling * _lora_slice(*old, member.axis, features)
                    x_after += module.scaling * _lora_slice(
                        module.lora_A, module.lora_B, member.axis, features
                    )
                rows_dot = (x_before * x_after).sum(dim=1)
                rows_norm = x_before.square().sum(dim=1)
                if member.axis == "out" and module.bias is not None:
                    bias = module.bias.index_select(0, features).float()
                    rows_dot += m_before[:, 0] * m_after[:, 0] * bias.square()
                    rows_norm += (m_before[:, 0] * bias).square()
                dot[chunk] += rows_dot.view(-1, width).sum(dim=1).double().cpu()
                norm[chunk] += rows_norm.view(-1, width).sum(dim=1).double().cpu()
        return dot, norm

    def _module(self, path: str) -> LoraPruneLinear:
        return self.pruner.model.get_submodule(path)

    def _agree(self) -> None:
        """Under data parallel: every rank must have chosen and masked the same units."""
        check = getattr(self.pruner, "check_masks_agree", None)
        if check is not None:
            check(extra=[s >= 0 for s in self.start])

    # -- checkpoints and the report ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for group, start, end, projected in zip(
            self.pruner.groups, self.start, self.end, self.projected, strict=True
        ):
            state[f"{group.name}.start"] = start
            state[f"{group.name}.end"] = end
            state[f"{group.name}.projected"] = projected
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor], steps_done: int, selections: list) -> None:
        """Restore :meth:`state_dict` (after the pruner's masks) and the fading layers' factors."""
        for group, start, end, projected in zip(
            self.pruner.groups, self.start, self.end, self.projected, strict=True
        ):
            for name, tensor in (("start", start), ("end", end), ("projected", projected)):
                key = f"{group.name}.{name}"
                if key not in state or state[key].shape != tensor.shape:
                    raise ValueError(f"fade state: {key} is missing or has the wrong shape")
                tensor.copy_(state[key])
        self.selections = [(int(step), float(ratio)) for step, ratio in selections]
        self.apply(steps_done)

    def to_dict(self) -> dict:
        """What the fade did, per group: units chosen and masked per step, and how many were projected."""
        groups = []
        for group, start, end, projected in zip(
            self.pruner.groups, self.start, self.end, self.projected, strict=True
        ):
            if not bool((start >= 0).any()):
                continue
            groups.append(
                {
                    "group": group.name,
                    "chosen_at": _histogram(start[start >= 0]),
                    "masked_at": _histogram(end[end >= 0]),
                    "projected": int(projected.sum()),
                    "fading": int(((start >= 0) & (end < 0)).sum()),
                }
            )
        return {
            "steps": self.fade_steps,
            "epsilon": self.epsilon,
            "factor": "m = 1 - k/fade_steps on the k-th step after a unit is chosen (base only; LoRA trains); "
            "masked after its fade_steps-th step, or when <x, x_hat> < epsilon·|x|^2 (half-space projection)",
            "selections": [{"step": step, "ratio": ratio} for step, ratio in self.selections],
            "masked_by_step": self.schedule.end if self.schedule is not None else self.fade_steps,
            "groups": groups,
        }


def _histogram(steps: torch.Tensor) -> dict[str, int]:
    return {str(step): count for step, count in sorted(Counter(steps.tolist()).items())}


def _features(units: torch.Tensor, width: int, device: torch.device) -> torch.Tensor:
    return (units[:, None] * width + torch.arange(width)).flatten().to(device)


def _weight_slice(module: LoraPruneLinear, axis: str, features: torch.Tensor) -> torch.Tensor:
    """``W``'s rows (``out``) or columns (``in``, transposed) at ``features``, fp32, feature-major."""
    if isinstance(module, QuantizedLoraPruneLinear):
        if axis == "out":
            return module.dequantize_rows(features)
        columns = [module.dequantize_rows(block).index_select(1, features) for block in module.row_blocks()]
        return torch.cat(columns).T
    weight = module.weight
    return (weight.index_select(0, features) if axis == "out" else weight.index_select(1, features).T).float()


def _lora_slice(
    lora_a: torch.Tensor, lora_b: torch.Tensor, axis: str, features: torch.Tensor
) -> torch.Tensor:
    """``(B·A)``'s rows or columns (transposed) at ``features``, fp32, feature-major."""
    if axis == "out":
        return lora_b.index_select(0, features).float() @ lora_a.float()
    return lora_a.index_select(1, features).T.float() @ lora_b.T.float()


__all__ = ["DEFAULT_EPSILON", "Fader", "check_oneshot_fade", "fade_options"]
