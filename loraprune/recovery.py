"""LoRAShear's dynamic knowledge recovery: the fine-tuning after the target is reached, in stages over
several text sources, each stage's source chosen from the held-out losses (``recovery_sources``,
``recovery_stages``, ``recovery_rule``).

LoRAShear (Chen et al. 2023, arXiv 2310.18356) recovers the pruned model on pretraining-like text and then on
instruction text, sampling more of the pretraining categories where the pruned model's held-out performance
deviates most from the full model's. Here the recovery is the cool-down of the run (the steps after the
exact target is masked: ``T − cT`` to ``T``; in one-shot mode every step after the fade), split into
``recovery_stages`` stages of equal length (default: one per source). The sources are ``--data`` (its
training windows) and every ``--recovery-data``; ``heldout_windows`` windows of each are held out and never
trained on. Before each stage the current model's held-out loss is measured on every source and the stage
trains on the one the rule picks:

- ``deviation`` (default; the paper's rule): the largest deviation from the unpruned model,
  ``loss_now − loss_dense``, the dense losses being measured before the first step;
- ``drop``: the largest fall of the held-out loss during the previous stage (the first stage: ``deviation``).

Stages are chosen, never scheduled by name: pass the sources (e.g. pretraining-like text and instruction
text) and the rule decides which of them each stage trains on. Every choice, with the losses it was made on,
is recorded in ``prune_report.json`` (``recovery``) and in checkpoints (a resumed run keeps the choices).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraprune.data import WindowSampler

RECOVERY_RULES = ("deviation", "drop")


def check_recovery_options(stages: int | None, rule: str | None) -> None:
    if stages is not None and (isinstance(stages, bool) or not isinstance(stages, int) or stages < 1):
        raise ValueError(f"recovery_stages must be a positive integer, got {stages!r}")
    if rule is not None and rule not in RECOVERY_RULES:
        raise ValueError(f"recovery_rule must be one of {RECOVERY_RULES}, got {rule!r}")


@dataclass(frozen=True)
class RecoverySource:
    name: str
    train: torch.Tensor  # token windows trained on
    heldout: torch.Tensor  # token windows held out: the losses the choices are made on


class Recovery:
    """The stages of the recovery over steps ``start`` to ``end`` and the source each one trains on."""

    def __init__(
        self,
        sources: list[RecoverySource],
        batch_size: int,
        seed: int,
        start: int,
        end: int,
        stages: int,
        rule: str,
    ) -> None:
        steps = end - start
        if steps < 1:
            raise ValueError(
                "recovery_data: the recovery trains during the cool-down (the steps after the target is "
                "masked), and this schedule has none (cooldown too short)"
            )
        if stages > steps:
            raise ValueError(
                f"recovery_stages ({stages}) exceeds the {steps} optimizer steps of the recovery (the "
                f"cool-down, steps {start} to {end})"
            )
        self.sources, self.rule, self.end = sources, rule, end
        self.samplers = [WindowSampler(source.train, batch_size, seed) for source in sources]
        self.boundaries = [start + (index * steps) // stages for index in range(stages)]
        self.dense: list[float] | None = None  # the unpruned model's held-out losses
        self.stages: list[dict] = []  # the stages begun, with what their choice was made on
        self.final: list[float] | None = None  # held-out losses at the end of the run

    def stage_at(self, steps_done: int) -> int | None:
        """The stage the optimizer step after ``steps_done`` belongs to (``None``: before the recovery)."""
        past = [index for index, boundary in enumerate(self.boundaries) if boundary <= steps_done]
        return past[-1] if past else None

    def due(self, steps_done: int) -> bool:
        """Whether a stage starts with the step after ``steps_done`` and its source is still to choose."""
        stage = self.stage_at(steps_done)
        return stage is not None and stage == len(self.stages)

    def sampler(self, steps_done: int) -> WindowSampler | None:
        """The chosen source's sampler for the step after ``steps_done`` (``None``: the run's own)."""
        stage = self.stage_at(steps_done)
        return None if stage is None else self.samplers[self.stages[stage]["source_index"]]

    def choose(self, steps_done: int, losses: list[float]) -> dict:
        """Begin the stage at ``steps_done`` on the source the rule picks from the held-out ``losses``."""
        if self.dense is None:
            raise RuntimeError("recovery: the unpruned model's held-out losses were never measured")
        stage = len(self.stages)
        deviation = [now - dense for now, dense in zip(losses, self.dense, strict=True)]
        drop = None
        if stage:
            before = self.stages[-1]["heldout_loss"]
            drop = [then - now for then, now in zip(before, losses, strict=True)]
        by_drop = self.rule == "drop" and drop is not None
        key = drop if by_drop else deviation
        index = max(range(len(key)), key=lambda i: (key[i], -i))
        boundaries = [*self.boundaries, self.end]
        record = {
            "stage": stage,
            "start_step": boundaries[stage],
            "end_step": boundaries[stage + 1],
            "source": self.sources[index].name,
            "source_index": index,
            "chosen_by": "drop" if by_drop else "deviation",
            "heldout_loss": losses,
            "deviation": deviation,
            "drop": drop,
        }
        self.stages.append(record)
        return record

    def state(self) -> dict:
        return {"dense": self.dense, "stages": self.stages, "final": self.final}

    def load_state(self, state: dict) -> None:
        self.dense, self.stages, self.final = state["dense"], state["stages"], state["final"]

    def to_dict(self) -> dict:
        names = [source.name for source in self.sources]
        return {
            "rule": self.rule,
            "stages_planned": len(self.boundaries),
            "sources": [
                {
                    "name": source.name,
                    "train_windows": len(source.train),
                    "heldout_windows": len(source.heldout),
                    "dense_loss": None if self.dense is None else self.dense[index],
                }
                for index, source in enumerate(self.sources)
            ],
            "stages": self.stages,
            "final_heldout_loss": None if self.final is None else dict(zip(names, self.final, strict=True)),
        }


__all__ = ["RECOVERY_RULES", "Recovery", "RecoverySource", "check_recovery_options"]
