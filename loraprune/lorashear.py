"""LoRAShear (Chen et al. 2023, arXiv 2310.18356) as a method of the LoRAPrune loop (``--method lorashear``).

LoRAShear's four parts, as the paper describes them, and what this package runs for each:

1. **Minimally removable structures over the base and LoRA modules** (the paper builds them from a
   dependency graph of the model with its LoRA modules): a set of base-weight rows/columns, and the LoRA
   rows/columns attached to them, that must be removed together for the model to stay valid. The
   :class:`~loraprune.structures.StructureGroup` units are exactly these: a KV group (its k/v rows, the rows
   of its query heads and their o_proj columns) or a query head inside every KV group (``gqa_unit
   q_head``), and an MLP channel (a gate row, an up row, a down_proj column). The LoRA factors follow their
   base matrix: a unit's rows of ``B`` for the row members (q/k/v/gate/up) and its columns of ``A`` for the
   column members (o/down) are what compaction removes with it (``B·A`` is merged and the unit's rows or
   columns dropped), and a masked unit contributes exactly zero through both paths. What is not covered: the
   hidden size (one structure spanning the embeddings, every norm and every layer's input and output
   projections), which neither LoRAPrune nor this package prunes, whatever a dependency graph would allow.
2. **Knowledge distribution analysis** (:mod:`loraprune.protect`, ``protect_fraction`` γ): the held-out loss
   increase of removing each structure; the most damaging fraction γ is never pruned. The paper's
   granularity is ``protect_by="unit"``; ``layer`` removes each layer's attention or MLP whole, the cheap
   proxy. LoRAShear prunes every layer and lets this analysis decide what stays, where LoRAPrune skips the
   first 10% and the last layer by hand: ``--method lorashear`` prunes all layers unless ``--layers`` says
   otherwise.
3. **LHSPG** (:mod:`loraprune.fade`, ``fade_steps`` N): a chosen unit's frozen base fades to zero over N
   steps while LoRA keeps training (``x = m·W + s·B·A``, ``m = 1 → 0``), projected onto zero (masked) when an
   update crosses the half-space of its direction, ``⟨x, x̂⟩ < ε‖x‖²``; masked at the end of its fade
   otherwise. The paper's LHSPG drives the redundant groups to zero progressively over its pruning
   periods, with HSPG's projection, while LoRA transfers their knowledge; its exact update of the frozen
   weights could not be checked here (no public code, and only summaries of the text were at hand). LoRA
   cannot cancel a full-rank block of the frozen weight, so the base's factor ``m`` is what fades here (the
   ``m·W`` formulation of issue #25). Units are chosen by the criterion (``--criterion``) on LoRAPrune's
   cubic schedule, compressed so that the last fade ends at the cool-down (the paper picks its redundant
   groups by a saliency score over a fixed number of periods).
4. **Dynamic knowledge recovery** (:mod:`loraprune.recovery`, ``--recovery-data``): the cool-down trains in
   stages on several text sources, each stage's source the one whose held-out loss deviates most from the
   unpruned model's (the paper's rule; ``recovery_rule="drop"``: where the held-out loss fell most in the
   previous stage). The paper recovers on pretraining data, then on instruction data; pass both as sources.

``--method lorashear`` turns parts 2 and 3 on with the defaults below (every default is overridden by
its own flag, ``--protect-fraction 0`` or ``--fade-steps 0`` included, so that each part is measured alone)
and part 4 wherever ``--recovery-data`` is given; ``--method loraprune`` (the default) runs none of them
unless its flag asks. Each part is also an option of :class:`~loraprune.run.RunConfig`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict

import torch

from loraprune.fade import Fader, check_oneshot_fade, fade_options
from loraprune.protect import (
    DEFAULT_HELDOUT_WINDOWS,
    Protection,
    check_reachable,
    choose_protected,
    heldout_split,
    knowledge_distribution,
    protect_options,
)
from loraprune.recovery import RECOVERY_RULES, Recovery, RecoverySource, check_recovery_options

METHODS = ("loraprune", "lorashear")
PROTECT_FRACTION = 0.1  # --method lorashear: γ, about the share of layers LoRAPrune skips by hand
ALL_LAYERS = "all"


def method_options(
    method: str,
    *,
    protect_fraction: float | None,
    fade_steps: int | None,
    layers: tuple[int, ...] | str | None,
    prune_every: int,
) -> dict:
    """The method's settings where their flags were left unset (``None``): ``protect_fraction``,
    ``fade_steps`` (``lorashear``: one pruning interval, ``prune_every``) and ``layers`` (``lorashear``:
    every layer, ``"all"``)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    lorashear = method == "lorashear"
    if protect_fraction is None:
        protect_fraction = PROTECT_FRACTION if lorashear else 0.0
    if fade_steps is None:
        fade_steps = prune_every if lorashear else 0
    if layers is None and lorashear:
        layers = ALL_LAYERS
    return {"protect_fraction": protect_fraction, "fade_steps": fade_steps, "layers": layers}


def check_options(config) -> None:
    """Check and default a :class:`~loraprune.run.RunConfig`'s LoRAShear options in place."""
    config.protect_by = protect_options(config.protect_fraction, config.protect_by)
    config.fade_epsilon = fade_options(config.fade_steps, config.fade_epsilon)
    check_recovery_options(config.recovery_stages, config.recovery_rule)
    count = config.heldout_windows
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ValueError(f"heldout_windows must be a positive integer, got {count!r}")
    if config.mode == "oneshot" and config.fade_steps:
        check_oneshot_fade(config.steps, config.fade_steps)


def hold_out(
    config, windows: torch.Tensor, sources: dict[str, torch.Tensor], data_name: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The training windows of ``--data`` and, where protection or recovery needs them, those held out."""
    if not sources and (config.recovery_stages is not None or config.recovery_rule is not None):
        name = "recovery_stages" if config.recovery_stages is not None else "recovery_rule"
        raise ValueError(f"{name} needs recovery sources (recovery_data): the sources the stages choose from")
    if config.protect_fraction == 0 and not sources:
        if config.heldout_windows is not None:
            raise ValueError(
                "heldout_windows needs protect_fraction > 0 or recovery sources (recovery_data): nothing else "
                "uses held-out windows"
            )
        return windows, None
    if data_name in sources:
        raise ValueError(f"recovery_data: {data_name} is the pruning data already (or is given twice)")
    return heldout_split(windows, config.heldout_windows or DEFAULT_HELDOUT_WINDOWS, seed, data_name)


def build_recovery(
    config,
    windows: torch.Tensor,
    heldout: torch.Tensor | None,
    sources: dict[str, torch.Tensor],
    data_name: str,
    seed: int,
    start: int,
) -> Recovery | None:
    """The staged recovery over ``--data`` (its training and held-out windows) and ``sources``, from step
    ``start`` (the first of the cool-down) to the end of the run; ``None`` without sources."""
    if not sources:
        return None
    count = config.heldout_windows or DEFAULT_HELDOUT_WINDOWS
    chosen = [RecoverySource(data_name, windows, heldout)]
    for name, source in sources.items():
        train, held = heldout_split(source, count, seed, name)
        chosen.append(RecoverySource(name, train, held))
    stages = config.recovery_stages or len(chosen)
    rule = config.recovery_rule or RECOVERY_RULES[0]
    return Recovery(chosen, config.batch_size, seed, start, config.steps, stages, rule)


def protect(
    pruner,
    heldout: torch.Tensor,
    config,
    amp_dtype: torch.dtype | None,
    progress: bool,
    agree: Callable = lambda value: value,
) -> Protection:
    """The knowledge-distribution analysis on ``heldout`` (``agree``: the first process's result under data
    parallel), its protected units checked against the pruner's ratio and handed to the pruner."""
    started = time.perf_counter()
    base, increases = agree(
        knowledge_distribution(pruner, heldout, config.protect_by, config.batch_size, amp_dtype, progress)
    )
    groups, fraction = pruner.groups, config.protect_fraction
    protected, exempt = choose_protected(groups, increases, fraction, config.protect_by)
    passes = 1 + sum(len(values) for values in increases)
    protection = Protection(
        fraction,
        config.protect_by,
        len(heldout),
        base,
        increases,
        protected,
        exempt,
        passes=passes,
        tokens=passes * heldout.numel(),
        wall_time_s=time.perf_counter() - started,
    )
    masks = protection.masks(groups)
    check_reachable(groups, masks, exempt, pruner.config.ratio, pruner.config.ranking, fraction)
    pruner.protect(masks, exempt)
    return protection


def report(protection: Protection | None, fader: Fader | None, recovery: Recovery | None, groups) -> dict:
    """``prune_report.json``'s ``protect``, ``fade`` and ``recovery`` (those that ran)."""
    sections = {}
    if protection is not None:
        sections["protect"] = protection.to_dict(groups)
    if fader is not None:
        sections["fade"] = fader.to_dict()
    if recovery is not None:
        sections["recovery"] = recovery.to_dict()
    return sections


def checkpoint_state(
    protection: Protection | None, fader: Fader | None, recovery: Recovery | None
) -> tuple[dict[str, torch.Tensor], dict | None]:
    """What a checkpoint keeps of the three parts: tensors (the fade's per-unit steps) and metadata."""
    if protection is None and fader is None and recovery is None:
        return {}, None
    tensors = {} if fader is None else {f"fade.{k}": v for k, v in fader.state_dict().items()}
    metadata = {
        "protection": None if protection is None else asdict(protection),
        "fade_selections": None if fader is None else fader.selections,
        "recovery": None if recovery is None else recovery.state(),
    }
    return tensors, metadata


def load_checkpoint_state(
    metadata: dict | None,
    tensors: dict[str, torch.Tensor],
    fader: Fader | None,
    recovery: Recovery | None,
    step: int,
) -> Protection | None:
    """Restore :func:`checkpoint_state` (after the pruner's state); returns the protection, if any."""
    metadata = metadata or {}
    if fader is not None:
        fade = {k.removeprefix("fade."): v for k, v in tensors.items() if k.startswith("fade.")}
        fader.load_state_dict(fade, step, metadata.get("fade_selections") or [])
    if recovery is not None:
        recovery.load_state(metadata["recovery"])
    return None if metadata.get("protection") is None else Protection(**metadata["protection"])


__all__ = [
    "ALL_LAYERS",
    "METHODS",
    "PROTECT_FRACTION",
    "build_recovery",
    "check_options",
    "checkpoint_state",
    "hold_out",
    "load_checkpoint_state",
    "method_options",
    "protect",
    "report",
]
