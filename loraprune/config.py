"""Configuration of LoRA adapters and structured pruning."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CRITERIA = ("lora", "taylor", "act", "magnitude", "reconstruction", "random")
TAYLOR_IMPLS = ("fused", "materialized")
# Criteria whose element importance has a squared form (``act``: its Fisher form).
SQUARED_CRITERIA = ("lora", "taylor", "act")
LORA_MEMBERS = ("all", "rows")
GQA_UNITS = ("kv_group", "q_head")
RANKINGS = ("local", "global")
QUANTIZE_BASE = ("int8", "nf4")
LORA_ALPHA_MODES = ("fixed", "rank")


@dataclass
class LoraPruneConfig:
    """Everything that decides how a model is adapted and pruned.

    Attributes:
        ratio: target fraction of attention heads and of MLP channels removed in each pruned
            layer, in [0, 1).
        criterion: importance criterion: ``lora`` (LoRAPrune: from LoRA factors and their
            gradients), ``taylor`` (LLM-Pruner first order, element-wise ``|∂L/∂W ⊙ W'|``),
            ``act`` (structure-level first-order Taylor from the o_proj / down_proj inputs and
            their gradients, in loss units; the default), ``magnitude`` (L2 of the merged weights), ``reconstruction``
            (the o_proj / down_proj output error the closed-form refit cannot undo, from their input
            moments) or ``random`` (seeded). See :mod:`loraprune.importance`.
        taylor_impl: how ``taylor`` is computed: ``fused`` (from each layer's input and output
            gradient during the backward, no weight gradient; the default) or ``materialized``
            (from the frozen weights' real gradients, one out×in gradient per matrix). ``None``
            for every other criterion; setting it with another criterion is an error.
        lora_r, lora_alpha, lora_dropout: LoRA rank, alpha (scaling = alpha / r) and dropout.
        lora_final_r: PrunedLoRA (Xie et al. 2025): the adapters start at rank ``lora_r`` (a PEFT
            adapter taken over: at its own rank) and lose their least important rank components
            (row k of ``A`` with column k of ``B``) while they train, down to this rank; ``None``:
            the rank stays ``lora_r``. See :mod:`loraprune.lora_rank`.
        lora_alpha_mode: how alpha follows the rank as it shrinks: ``rank`` (alpha ∝ r, so the
            scaling ``alpha / r`` stays ``lora_alpha / lora_r`` and a removal changes the adapter
            only by the removed components: the paper's ``α = r`` when ``lora_alpha == lora_r``) or
            ``fixed`` (alpha stays ``lora_alpha``, the scaling becomes ``lora_alpha / r`` at the
            current rank, which scales the kept components up at every removal).
        rank_prune_every, rank_prune_count: the rank schedule: every ``rank_prune_every`` steps
            (K1) remove ``rank_prune_count`` components (K2) from each adapter; ``None``: the
            paper's K1 = 10, K2 = 2 where they finish by the end of the structure schedule,
            otherwise derived from the run length (see :func:`loraprune.lora_rank.rank_schedule`).
        target_modules: projections that get LoRA adapters.
        prune_heads, prune_channels: prune attention heads and/or MLP channels.
        gqa_unit: with grouped-query attention, prune whole KV groups (``kv_group``: k and v
            rows, their query heads and o_proj columns) or the same number of query heads inside
            every group (``q_head``). Identical for multi-head attention.
        layers: indices of the decoder layers to prune; ``None`` skips the first
            ``int(0.1·L)`` layers and the last one, as LoRAPrune does.
        ranking: ``local`` ranks each layer on its own (uniform ratio); ``global`` ranks the
            units of all pruned layers together.
        round_to: keep MLP channel counts at multiples of this (GEMMs are slow on unaligned
            sizes); applied when masks are chosen, so the masked and compacted models agree.
        ema_decay: λ of the moving average ``S ← λS + (1−λ)S_now``, from ``S = 0``.
        squared: element importance ``(G⊙W')²`` instead of ``|G⊙W'|`` (``lora``, ``taylor``);
            for ``act`` its Fisher form, the per-sequence square. Meaningless for ``magnitude``
            and ``random`` (rejected).
        lora_members: which member matrices the ``lora`` estimate scores a group from: ``all``
            (LoRAPrune), or ``rows`` (q/k/v and gate/up only): while ``B ≈ 0`` a column member's
            estimate (o_proj, down_proj columns) is ``s·∇W·AᵀA``, every column's gradient mixed
            into every other's (see ``benchmarks/criteria_probe.py`` for the measured effect).
            Default ``all``; ``None`` for every other criterion (setting it then is an error).
        seed: seeds the LoRA initialisation and the ``random`` criterion.
        quantize_base: hold the frozen projections in bitsandbytes ``int8`` (LLM.int8()) or
            ``nf4`` layers while LoRA stays fp32 (see :mod:`loraprune.quantization`); ``None``:
            as loaded (a model loaded quantized is taken over as it is).
    """

    ratio: float = 0.5
    criterion: str = "act"
    taylor_impl: str | None = None
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_final_r: int | None = None
    lora_alpha_mode: str = "rank"
    rank_prune_every: int | None = None
    rank_prune_count: int | None = None
    target_modules: tuple[str, ...] = ALL_PROJECTIONS
    prune_heads: bool = True
    prune_channels: bool = True
    gqa_unit: str = "kv_group"
    layers: tuple[int, ...] | None = None
    ranking: str = "local"
    round_to: int = 1
    ema_decay: float = 0.9
    squared: bool = False
    lora_members: str | None = None
    seed: int = 0
    quantize_base: str | None = None

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        if self.layers is not None:
            self.layers = tuple(int(i) for i in self.layers)
        check_ratio(self.ratio, "ratio")
        _check_choice("criterion", self.criterion, CRITERIA)
        self.taylor_impl = _criterion_option(
            "taylor_impl", self.taylor_impl, "taylor", self.criterion, TAYLOR_IMPLS
        )
        self.lora_members = _criterion_option(
            "lora_members", self.lora_members, "lora", self.criterion, LORA_MEMBERS
        )
        if self.squared and self.criterion not in SQUARED_CRITERIA:
            raise ValueError(
                f"squared has no meaning for criterion {self.criterion!r} (it applies to "
                f"{', '.join(SQUARED_CRITERIA)})"
            )
        _check_choice("gqa_unit", self.gqa_unit, GQA_UNITS)
        _check_choice("ranking", self.ranking, RANKINGS)
        if self.quantize_base is not None:
            _check_choice("quantize_base", self.quantize_base, QUANTIZE_BASE)
        if isinstance(self.lora_r, bool) or not isinstance(self.lora_r, int) or self.lora_r <= 0:
            raise ValueError(f"lora_r must be a positive integer, got {self.lora_r!r}")
        _check_choice("lora_alpha_mode", self.lora_alpha_mode, LORA_ALPHA_MODES)
        for name in ("lora_final_r", "rank_prune_every", "rank_prune_count"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.lora_final_r is not None and self.lora_final_r > self.lora_r:
            raise ValueError(
                f"lora_final_r ({self.lora_final_r}) must not exceed lora_r ({self.lora_r}): the rank "
                "only shrinks"
            )
        if self.lora_final_r is None:
            for name, unset in (
                ("rank_prune_every", None),
                ("rank_prune_count", None),
                ("lora_alpha_mode", "rank"),
            ):
                if getattr(self, name) != unset:
                    raise ValueError(f"{name} needs lora_final_r (the rank to prune the adapters to)")
        if not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        unknown = set(self.target_modules) - set(ALL_PROJECTIONS)
        if unknown or not self.target_modules:
            raise ValueError(
                f"target_modules must be a non-empty subset of {ALL_PROJECTIONS}, got {self.target_modules!r}"
            )
        if not isinstance(self.round_to, int) or self.round_to < 1:
            raise ValueError(f"round_to must be a positive integer, got {self.round_to!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if not (self.prune_heads or self.prune_channels):
            raise ValueError("prune_heads and prune_channels are both False: nothing to prune")

    @property
    def lora_scaling(self) -> float:
        return self.lora_alpha / self.lora_r

    def to_dict(self) -> dict:
        return asdict(self)


def check_ratio(value: float, name: str = "ratio") -> float:
    """A pruning ratio: a real number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def _criterion_option(
    name: str, value: str | None, owner: str, criterion: str, choices: tuple[str, ...]
) -> str | None:
    """An option of criterion ``owner``: its first choice by default, an error with another criterion."""
    if value is None:
        return choices[0] if criterion == owner else None
    _check_choice(name, value, choices)
    if criterion != owner:
        raise ValueError(f"{name} applies to criterion {owner!r} only, got criterion {criterion!r}")
    return value


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
