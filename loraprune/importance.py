"""Importance criteria and their moving average per structure group.

Every criterion but ``act`` produces, for each member matrix of a group, an importance vector
along the member's pruned axis; :func:`loraprune.ops.score_update` then L2-normalises each
vector, folds it into the group's units and adds the members. As in the authors' LoRAPrune code
(``update_sensitivity_dict``), the moving average of every criterion starts from zero,
``S ← λS + (1−λ)·now``, and a step whose importance holds NaN/Inf in any group is skipped in all.

- ``lora`` (LoRAPrune): ``|G ⊙ (W + s·B·A)|`` with ``G = gB·A + B·gA − gB·gA`` estimated from
  the LoRA factors and their gradients: the gradient of ``W`` is never formed. As in the authors'
  ``compute_sensitivity``, each member's vector is summed into units before it is L2-normalised.
- ``taylor`` (LLM-Pruner, first order): ``|∂L/∂W ⊙ (W + s·B·A)|``. ``fused`` (default): each
  member layer keeps its input ``X`` and output gradient ``dY`` of the backward the loop runs
  anyway and reduces ``|(dYᵀX) ⊙ W'|`` to rows / columns with :func:`loraprune.ops.taylor_importance`
  (no weight gradient, memory O(out + in)); ``materialized``: from the frozen weights' real
  gradients (one full-size gradient per matrix). With gradient accumulation, ``fused`` sums the
  micro-batches' ``|·|`` (``Σₘ|∂Lₘ/∂W ⊙ W'|``) while ``materialized`` takes ``|·|`` of the
  accumulated gradient; they are equal with one micro-batch per step.
- ``act`` (structure-level first-order Taylor, Molchanov et al. 2019, Kwon et al. 2022): the
  loss change of removing unit ``u``, ``|Σₜ ∂L/∂h_u(t) · h_u(t)|`` with ``h_u`` the unit's slice of
  the o_proj input (a head or KV group) or the down_proj input channel, summed over all tokens of
  an optimizer step (micro-batches included); ``squared``: its Fisher form ``Σ_seq (Σ_{t∈seq} ·)²``.
  O(units) accumulators; the scores stay in loss units (no normalisation), so ``ranking="global"``
  compares units across layers on one scale.
- ``magnitude``: ``(W + s·B·A)²``: the squared L2 norm of each row / column.
- ``reconstruction`` (refit-aware, SliceGPT's removal cost): the output error of o_proj / down_proj that the
  closed-form refit (:mod:`loraprune.refit`) cannot undo when the unit's columns go,
  :func:`loraprune.refit.removal_costs`. The moving average is of the consumer's input moments
  ``E[x xᵀ]``, ``E[x]`` over the training forwards (bias-corrected); the costs follow from them, the
  current masks and the merged weight when masks are chosen (:meth:`ImportanceTracker.refresh`). Memory:
  two fp32 ``in×in`` per pruned consumer (0.3 GB a copy for SmolLM2-135M's 30 layers; 17.7 GB for
  LLaMA-7B's 32).
- ``random``: fixed seeded scores.
"""

from __future__ import annotations

import torch
from torch import nn

from loraprune import ops
from loraprune.config import LoraPruneConfig
from loraprune.nn import LoraPruneLinear
from loraprune.quantization import QuantizedLoraPruneLinear
from loraprune.refit import ConsumerStatistics, removal_costs
from loraprune.structures import Member, StructureGroup


def merged_weight(module: LoraPruneLinear) -> torch.Tensor:
    """``W + s·B·A`` in float32 (full size: used by the baselines only)."""
    weight = module.weight.float()
    if module.lora_A is not None:
        weight = weight + module.scaling * (module.lora_B.float() @ module.lora_A.float())
    return weight


class _GradientTap(torch.autograd.Function):
    """Identity on ``tensor``; its backward hands ``saved`` and ``tensor``'s gradient to ``sink``.

    ``anchor`` (a 0-dim tensor that requires grad) makes the output require grad, so that the
    backward reaches the tap even where nothing upstream of ``tensor`` is trainable.
    """

    @staticmethod
    def forward(ctx, tensor, saved, anchor, sink):
        ctx.save_for_backward(saved)
        ctx.sink = sink
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        (saved,) = ctx.saved_tensors
        ctx.sink(saved, grad)
        return grad, None, None, None


class ScoreCapture:
    """Collects one member's importance during the backward (``taylor`` fused, ``act``), or its input
    moments during the forward (``reconstruction``).

    Installed as ``module.score_capture``; it holds the layer's (unmasked) input, which the LoRA
    backward keeps anyway, and reduces it with the gradient at once into ``buffer`` (fp32). ``reconstruction``:
    ``buffer`` sums ``x xᵀ`` (in×in), ``sums`` sums ``x``, ``tokens`` counts them.
    """

    def __init__(
        self, module: LoraPruneLinear, member: Member, criterion: str, num_units: int, squared: bool
    ):
        self.module, self.axis, self.criterion = module, member.axis, criterion
        self.num_units, self.squared = num_units, squared
        size = module.out_features if member.axis == "out" else module.in_features
        device = module.out_mask.device
        shape = {"taylor": (size,), "act": (num_units,), "reconstruction": (size, size)}[criterion]
        self.buffer = torch.zeros(shape, dtype=torch.float32, device=device)
        if criterion == "reconstruction":
            self.sums = torch.zeros(size, dtype=torch.float32, device=device)
            self.tokens = torch.zeros((), dtype=torch.int64, device=device)
        self.anchor = torch.zeros((), device=module.out_mask.device, requires_grad=True)
        self.backwards = 0  # passes collected since the last take() (backward; reconstruction: forward)

    def __call__(self, x: torch.Tensor, forward) -> torch.Tensor:
        if self.criterion == "reconstruction":
            self._moments(x)
            return forward(x)
        if self.criterion == "act":
            return forward(_GradientTap.apply(x, x, self.anchor, self._act))
        return _GradientTap.apply(forward(x), x, self.anchor, self._taylor)

    @torch.no_grad()
    def _moments(self, x: torch.Tensor) -> None:
        # masked columns are zero here: the costs read the kept ones only
        x = x.detach().reshape(-1, self.buffer.shape[0]).float()
        self.buffer.addmm_(x.T, x)
        self.sums += x.sum(dim=0)
        self.tokens += x.shape[0]
        self.backwards += 1

    @torch.no_grad()
    def _taylor(self, x: torch.Tensor, grad_y: torch.Tensor) -> None:
        module = self.module
        x = x.reshape(-1, module.in_features)
        grad_y = grad_y.reshape(-1, module.out_features)
        if module._in_masked:  # the weight saw the masked input; masked rows got no gradient
            x = x * module.in_mask.to(x.dtype)
        if module._out_masked:
            grad_y = grad_y * module.out_mask.to(grad_y.dtype)
        if isinstance(module, QuantizedLoraPruneLinear):  # W dequantized a row block at a time
            rows, cols = module.taylor_importance(x, grad_y, squared=self.squared)
        else:
            rows, cols = ops.taylor_importance(
                x, grad_y, module.weight, module.lora_A, module.lora_B, module.scaling, squared=self.squared
            )
        self.buffer += rows if self.axis == "out" else cols
        self.backwards += 1

    @torch.no_grad()
    def _act(self, h: torch.Tensor, grad_h: torch.Tensor) -> None:
        # ∂L/∂m_u for a mask m_u scaling unit u's slice of h: Σ over its tokens and channels.
        sequences = h.shape[0] if h.ndim >= 3 else 1
        product = (h.float() * grad_h.float()).reshape(
            sequences, -1, self.num_units, h.shape[-1] // self.num_units
        )
        per_sequence = product.sum(dim=(1, 3))
        self.buffer += per_sequence.square().sum(dim=0) if self.squared else per_sequence.sum(dim=0)
        self.backwards += 1

    def take(self) -> torch.Tensor:
        """This step's importance (``act``: per unit, ``|·|`` applied); resets the accumulator."""
        self._check_collected()
        value = self.buffer.clone() if self.criterion == "taylor" or self.squared else self.buffer.abs()
        self.buffer.zero_()
        self.backwards = 0
        return value

    def take_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``reconstruction``: this step's ``E[x xᵀ]`` and ``E[x]`` (fp32, on the device: no host sync in the
        training step); resets the accumulators."""
        self._check_collected()
        tokens = self.tokens.clamp(min=1).float()
        value = (self.buffer / tokens, self.sums / tokens)
        for accumulator in (self.buffer, self.sums, self.tokens):
            accumulator.zero_()
        self.backwards = 0
        return value

    def _check_collected(self) -> None:
        if self.backwards == 0:
            raise RuntimeError(
                f"no backward pass reached {self.module.__class__.__name__} since the last update; "
                "call update() after backward() (in train mode, with gradients enabled)"
            )


def _input_member(group: StructureGroup) -> Member:
    """The member pruned along its input features (o_proj, down_proj): ``act`` hooks its input."""
    return next(m for m in group.members if m.axis == "in")


def _moving_average(
    scores: torch.Tensor,
    now: torch.Tensor,
    decay: float,
    updates: torch.Tensor,
    skipped: torch.Tensor,
    applied: torch.Tensor | None = None,
) -> None:
    """``S ← λS + (1−λ)·now`` from ``S = 0`` (the authors' ``update_sensitivity_dict``), on the device.

    The step is counted as skipped and leaves ``S`` alone unless ``applied`` (a 0-dim bool; by
    default: ``now`` is finite).
    """
    if applied is None:
        applied = torch.isfinite(now).all()
    _blend(scores, now, decay, applied)
    updates.add_(applied.long())
    skipped.add_((~applied).long())


def _blend(state: torch.Tensor, now: torch.Tensor, decay: float, applied: torch.Tensor) -> None:
    state.copy_(torch.where(applied, decay * state + (1.0 - decay) * now, state))


def reduce_axis(element: torch.Tensor, axis: str) -> torch.Tensor:
    return element.sum(dim=1) if axis == "out" else element.sum(dim=0)


class ImportanceTracker:
    """Running importance scores of every structure group of a model.

    Call :meth:`update` after each backward pass (with unscaled gradients), before the
    optimizer zeroes them. Scores, update and skip counters live on each group's layer's device.
    """

    def __init__(self, model: nn.Module, groups: list[StructureGroup], config: LoraPruneConfig) -> None:
        self.model = model
        self.groups = groups
        self.criterion = config.criterion
        self.decay = config.ema_decay
        self.squared = config.squared
        # each group's state lives on its layer's device (a model may span several, see device_map)
        devices = [self._module(g.members[0]).out_mask.device for g in groups]
        self.scores = [
            torch.zeros(g.num_units, dtype=torch.float32, device=d)
            for g, d in zip(groups, devices, strict=True)
        ]
        self.num_updates = [torch.zeros((), dtype=torch.int64, device=d) for d in devices]
        self.num_skipped = [torch.zeros((), dtype=torch.int64, device=d) for d in devices]
        self.lora_rows_only = config.lora_members == "rows"
        if self.criterion == "lora":
            for group in groups:
                if not any(
                    self._module(m).lora_A is not None and not (self.lora_rows_only and m.axis == "in")
                    for m in group.members
                ):
                    raise ValueError(
                        f"criterion 'lora' needs LoRA on at least one matrix of {group.name} "
                        f"(lora_members {config.lora_members!r}); add its projections to target_modules"
                    )
        self.taylor_impl = config.taylor_impl
        if self.needs_weight_grad and any(
            isinstance(self._module(m), QuantizedLoraPruneLinear) for g in groups for m in g.members
        ):
            raise ValueError(
                "taylor_impl 'materialized' needs the frozen weights' gradients, which a quantized "
                "base (quantize_base) does not have; use taylor_impl 'fused'"
            )
        self.captures: dict[str, ScoreCapture] = {}
        if self.criterion in ("act", "reconstruction"):
            for group in groups:
                if not any(m.axis == "in" for m in group.members):
                    raise ValueError(
                        f"criterion {self.criterion!r} needs the input of {group.name}'s o_proj / down_proj "
                        "(a member pruned along its input features) to hook; this group has none"
                    )
        # reconstruction: moving averages of each group's consumer input moments E[x xᵀ], E[x] (fp32)
        self.moments: list[tuple[torch.Tensor, torch.Tensor]] = []
        if self.criterion == "reconstruction":
            for group, device in zip(groups, devices, strict=True):
                width = self._module(_input_member(group)).in_features
                self.moments.append(
                    (
                        torch.zeros(width, width, dtype=torch.float32, device=device),
                        torch.zeros(width, dtype=torch.float32, device=device),
                    )
                )
        if self.fused:
            for group in groups:
                hooked = group.members if self.criterion == "taylor" else (_input_member(group),)
                for member in hooked:
                    module = self._module(member)
                    self.captures[member.path] = ScoreCapture(
                        module, member, self.criterion, group.num_units, self.squared
                    )
                    module.score_capture = self.captures[member.path]
        if self.criterion == "random":
            generator = torch.Generator().manual_seed(config.seed)
            for scores, counter in zip(self.scores, self.num_updates, strict=True):
                scores.copy_(torch.rand(scores.shape, generator=generator))
                counter.fill_(1)

    @property
    def needs_weight_grad(self) -> bool:
        """Whether the frozen weights must receive gradients during backward (``taylor`` materialized)."""
        return self.criterion == "taylor" and self.taylor_impl == "materialized"

    @property
    def fused(self) -> bool:
        """Whether importance is collected by hooks during the pass (``taylor`` fused, ``act``, ``reconstruction``)."""
        return self.criterion in ("act", "reconstruction") or (
            self.criterion == "taylor" and self.taylor_impl == "fused"
        )

    def stop_capture(self) -> None:
        """Remove the backward hooks (scoring is over): later backward passes collect nothing."""
        for path in self.captures:
            self.model.get_submodule(path).score_capture = None
        self.captures.clear()

    def _module(self, member: Member) -> LoraPruneLinear:
        return self.model.get_submodule(member.path)

    @torch.no_grad()
    def update(self) -> None:
        """Fold this step's importance into the running scores (no-op for ``random``): in every group,
        or, when any group's importance holds NaN/Inf, in none (counted as skipped)."""
        if self.criterion == "random":
            return
        if self.criterion == "reconstruction":
            self._update_moments()
            return
        steps = [
            self._step_importance(group, scores)
            for group, scores in zip(self.groups, self.scores, strict=True)
        ]
        # A model may span several devices: gather the groups' flags on the first one.
        home = self.scores[0].device
        applied = torch.stack([finite.to(home) for _, finite in steps]).all()
        for (now, _), scores, updates, skipped in zip(
            steps, self.scores, self.num_updates, self.num_skipped, strict=True
        ):
            _moving_average(scores, now, self.decay, updates, skipped, applied.to(scores.device))

    def _update_moments(self) -> None:
        steps = [self._capture(_input_member(group)).take_moments() for group in self.groups]
        home = self.scores[0].device
        applied = torch.stack(
            [
                (torch.isfinite(moment).all() & torch.isfinite(average).all()).to(home)
                for moment, average in steps
            ]
        ).all()
        for (moment, average), (second, mean), updates, skipped in zip(
            steps, self.moments, self.num_updates, self.num_skipped, strict=True
        ):
            flag = applied.to(second.device)
            _blend(mean, average, self.decay, flag)
            _moving_average(second, moment, self.decay, updates, skipped, flag)

    @torch.no_grad()
    def refresh(self) -> None:
        """``reconstruction``: the scores become each unit's removal cost now (from the moments' moving averages,
        bias-corrected, the current masks and merged weights); a no-op for every other criterion."""
        if self.criterion != "reconstruction":
            return
        for group, scores, (second, mean), updates in zip(
            self.groups, self.scores, self.moments, self.num_updates, strict=True
        ):
            count = int(updates)
            if count == 0:
                continue
            correction = 1.0 - self.decay**count
            module = self._module(_input_member(group))
            statistics = ConsumerStatistics(second.double() / correction, mean.double() / correction, 0)
            covariance = statistics.covariance(centred=module.bias is not None)
            width = module.in_features // group.num_units
            costs = removal_costs(module.merged_weight().double(), covariance, module.in_mask, width)
            scores.copy_(costs.to(scores.device))

    def _step_importance(
        self, group: StructureGroup, scores: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's importance per unit of ``group`` and whether it is finite (0-dim bool)."""
        if self.criterion == "act":
            now = self._capture(_input_member(group)).take()
            return now, torch.isfinite(now).all()
        parts = [v for m in group.members if (v := self.member_importance(m)) is not None]
        if self.criterion == "lora":  # the authors' compute_sensitivity: into units, then the norm
            parts = [p.reshape(group.num_units, -1).sum(dim=1) for p in parts]
        now = torch.zeros_like(scores)
        fresh, skipped = (torch.zeros((), dtype=torch.int64, device=scores.device) for _ in range(2))
        # A first update (fresh counter) sets now = Σ fold(p/‖p‖), or leaves it if that is not finite.
        ops.score_update(now, parts, 0.0, fresh, skipped)
        return now, skipped == 0

    def _capture(self, member: Member) -> ScoreCapture:
        if member.path not in self.captures:
            raise RuntimeError(f"{member.path}: scoring is finished (stop_capture was called)")
        return self.captures[member.path]

    def member_importance(self, member: Member) -> torch.Tensor | None:
        """One member's importance vector along its pruned axis (``None``: no LoRA to estimate from)."""
        module = self._module(member)
        if self.criterion == "lora":
            if module.lora_A is None or (self.lora_rows_only and member.axis == "in"):
                return None
            if module.lora_A.grad is None or module.lora_B.grad is None:
                raise RuntimeError(
                    f"{member.path}: LoRA factors have no gradient; call update() after "
                    "backward() and before zero_grad()"
                )
            if isinstance(module, QuantizedLoraPruneLinear):  # W dequantized a row block at a time
                rows, cols = module.lora_importance(squared=self.squared)
                return rows if member.axis == "out" else cols
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
        if self.criterion == "taylor" and self.taylor_impl == "fused":
            return self._capture(member).take()
        if self.criterion == "taylor":
            if module.weight.grad is None:
                raise RuntimeError(
                    f"{member.path}: the frozen weight has no gradient; the taylor criterion "
                    "needs weight.requires_grad during backward (LoraPruner sets it)"
                )
            element = module.weight.grad.float() * merged_weight(module)
            element = element.square() if self.squared else element.abs()
            return reduce_axis(element, member.axis)
        if isinstance(module, QuantizedLoraPruneLinear):
            rows, cols = module.magnitude_importance()
            return rows if member.axis == "out" else cols
        return reduce_axis(merged_weight(module).square(), member.axis)  # magnitude

    def num_applied_updates(self) -> int:
        """The fewest updates any group has received (synchronises with the device)."""
        return min(int(c) for c in self.num_updates) if self.num_updates else 0

    def total_skipped(self) -> int:
        """Score updates (steps) skipped for NaN/Inf so far (synchronises)."""
        return max((int(c) for c in self.num_skipped), default=0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for group, scores, updates, skipped in zip(
            self.groups, self.scores, self.num_updates, self.num_skipped, strict=True
        ):
            state[f"{group.name}.scores"] = scores
            state[f"{group.name}.num_updates"] = updates
            state[f"{group.name}.num_skipped"] = skipped
        if self.moments:  # reconstruction
            for group, (second, mean) in zip(self.groups, self.moments, strict=True):
                state[f"{group.name}.second_moment"] = second
                state[f"{group.name}.mean"] = mean
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for index, group in enumerate(self.groups):
            tensors = [
                ("scores", self.scores[index]),
                ("num_updates", self.num_updates[index]),
                ("num_skipped", self.num_skipped[index]),
            ]
            if self.moments:
                tensors += zip(("second_moment", "mean"), self.moments[index], strict=True)
            for name, tensor in tensors:
                key = f"{group.name}.{name}"
                if key not in state or state[key].shape != tensor.shape:
                    raise ValueError(f"importance state: {key} is missing or has the wrong shape")
                tensor.copy_(state[key])
