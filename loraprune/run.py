"""The LoRAPrune procedure: prune on a cubic schedule while LoRA fine-tunes; resumable.

One plain loop (no Trainer): AdamW on the LoRA factors, gradient accumulation and clipping,
autocast on the GPU with loss scaling for fp16 (scores are computed after ``unscale_``, on the
true gradients). After every optimizer-step backward the importance moves; at each pruning step
the masks grow to the schedule's ratio, reaching the exact target at ``T − cT``; the masked
model then keeps fine-tuning to ``T``. With ``lora_final_r`` the adapters also lose rank components on
their own schedule (:func:`loraprune.lora_rank.rank_schedule`), reaching the final rank by ``T − cT``
as well; the optimizer's state is narrowed with them. ``mode="oneshot"`` is LLM-Pruner's recipe instead:
score once on calibration batches, prune to the target, then fine-tune. A closed-form refit of
o_proj and down_proj before compaction (``reconstruct``, :mod:`loraprune.refit`) is on by default
wherever it can run (``None``: decided per model and data by :func:`resolve_options`, with a note where
it is left off); distillation from the unpruned model during the fine-tuning (``distill_weight``,
:mod:`loraprune.distill`) is an option.
LoRAShear's parts (:mod:`loraprune.lorashear`): the knowledge-distribution protection before the first step
(``protect_fraction``, :mod:`loraprune.protect`), chosen units fading out over ``fade_steps`` instead of being
masked at once (:mod:`loraprune.fade`), and the cool-down as a staged recovery over several text sources
(``recovery_sources``, :mod:`loraprune.recovery`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import resource
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from loraprune import lorashear
from loraprune.checkpoint import (
    check_same_settings,
    load_pruning_state,
    pruning_state,
    read_checkpoint_file,
    write_checkpoint_file,
)
from loraprune.config import LoraPruneConfig
from loraprune.data import WindowSampler
from loraprune.distill import Distiller, distill_options
from loraprune.fade import Fader
from loraprune.lora_rank import RankSchedule, rank_schedule
from loraprune.masks import cubic_ratio_between, pruning_steps
from loraprune.protect import Protection, heldout_loss
from loraprune.pruner import LoraPruner
from loraprune.refit import DEFAULT_SAMPLES as DEFAULT_REFIT_SAMPLES
from loraprune.refit import ConsumerRefit, calibration_windows, reconstruct, reconstruct_options
from loraprune.structures import unwrap_model

MODES = ("iterative", "oneshot")


def _check_positive_ints(owner: object, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(owner, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_phases(warmup: float, cooldown: float) -> None:
    if not (0 <= warmup < 1 and 0 <= cooldown < 1 and warmup + cooldown < 1):
        raise ValueError(
            f"warmup and cooldown must be fractions in [0, 1) summing below 1, got {warmup} and {cooldown}"
        )


@dataclass(frozen=True)
class PruneSchedule:
    """The iterative schedule over ``steps`` optimizer steps (the CLI's loop and the Trainer callback).

    Masks grow every ``prune_every`` steps past the warm-up (``warmup·steps``) to the cubic schedule's
    ratio, and reach the target at the first step of the cool-down (``end``, ``steps − cooldown·steps``);
    importance is scored on every step before that last pruning step. With ``fade_steps`` N
    (:mod:`loraprune.fade`) the units are chosen on the same grid, the last time at ``end − N``, to the cubic
    ratio between ``wT`` and ``T − cT − N``, so that every chosen unit has faded out and is masked at ``end``.
    """

    steps: int
    prune_every: int = 10
    warmup: float = 0.1
    cooldown: float = 0.1
    fade_steps: int = 0

    def __post_init__(self) -> None:
        _check_positive_ints(self, ("steps", "prune_every"))
        _check_phases(self.warmup, self.cooldown)
        if self.steps < self.prune_every:
            raise ValueError(
                f"steps ({self.steps}) is fewer than prune_every ({self.prune_every}): the "
                "schedule needs at least one pruning step"
            )
        start = self.warmup * self.steps
        if self.fade_steps and self.end - self.fade_steps <= start:
            raise ValueError(
                f"fade_steps ({self.fade_steps}) must be shorter than the pruning window: units are chosen "
                f"after the warm-up (step {start:g}) and must have faded out by the start of the cool-down "
                f"(step {self.end}), so fade_steps < {self.end - start:g}"
            )

    @property
    def end(self) -> int:
        """The first step of the cool-down, where the masks reach the target."""
        return max(1, math.ceil(self.steps - self.cooldown * self.steps))

    @functools.cached_property
    def prune_steps(self) -> tuple[int, ...]:
        """Optimizer steps after which masks grow (with a fade: units are chosen and start fading): every
        ``prune_every`` steps past the warm-up, and the step that reaches the target (``end − fade_steps``)."""
        return pruning_steps(self.prune_every, self.warmup * self.steps, self.end - self.fade_steps)

    def scoring(self, steps_done: int) -> bool:
        """Whether the optimizer step after ``steps_done`` steps scores importance (until the last choice)."""
        return steps_done < self.prune_steps[-1]

    def ratio_after(self, steps_done: int, final_ratio: float) -> float:
        """The ratio the masks hold (with a fade: of units chosen) after ``steps_done`` optimizer steps."""
        past = [t for t in self.prune_steps if t <= steps_done]
        if not past:
            return 0.0
        end = self.steps - self.cooldown * self.steps - self.fade_steps
        return cubic_ratio_between(max(past), self.warmup * self.steps, end, final_ratio)

    def step_done(self, pruner: LoraPruner, steps_done: int) -> None:
        """After optimizer step ``steps_done``: grow the masks on a pruning step; after the last one,
        stop scoring."""
        if steps_done in self.prune_steps:
            pruner.prune(self.ratio_after(steps_done, pruner.config.ratio))
        if steps_done == self.prune_steps[-1]:
            pruner.finish_scoring()


@dataclass
class RunConfig:
    """How long and how the model fine-tunes while it is pruned (see the module docstring)."""

    steps: int = 200
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 512
    lr: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    prune_every: int = 10
    warmup: float = 0.1
    cooldown: float = 0.1
    mode: str = "iterative"
    calib_batches: int = 8
    calib_seq_len: int | None = None  # oneshot: tokens of each calibration window (None: seq_len)
    save_every: int = 50
    # α of (1−α)·CE + α·T²·KL(teacher‖student); 0: no distillation (the default: no gain in the
    # real-model study, at one more forward a step; README)
    distill_weight: float = 0.0
    distill_temperature: float | None = None  # T (None: 1.0 with distillation)
    reconstruct: bool | None = None  # refit o_proj and down_proj before compaction; None: where it can run
    reconstruct_lambda: float | None = None  # ridge, relative to mean(diag C) (None: 0.01)
    reconstruct_samples: int | None = None  # calibration windows of seq_len (None: 64, at most the data's)
    # LoRAShear (loraprune.lorashear): each part is an option of its own
    protect_fraction: float = 0.0  # γ: the most damaging fraction of structures is never pruned (0: off)
    protect_by: str | None = None  # "layer" (default with protect_fraction) or "unit"
    heldout_windows: int | None = None  # windows of each source held out (None: 16 where one is needed)
    fade_steps: int = 0  # a chosen unit's base fades to zero over this many steps, then masked (0: at once)
    fade_epsilon: float | None = None  # ε of the fade's half-space projection (None: 0.0 with a fade)
    recovery_stages: int | None = None  # the cool-down's stages over the sources (None: one per source)
    recovery_rule: str | None = None  # how a stage's source is chosen: "deviation" (default) or "drop"

    def __post_init__(self) -> None:
        _check_positive_ints(
            self, ("steps", "batch_size", "grad_accum", "seq_len", "prune_every", "calib_batches")
        )
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.calib_seq_len is not None and not (
            isinstance(self.calib_seq_len, int) and 2 <= self.calib_seq_len <= self.seq_len
        ):
            raise ValueError(
                f"calib_seq_len must be an integer from 2 to seq_len ({self.seq_len}), got {self.calib_seq_len!r}"
            )
        if not isinstance(self.save_every, int) or self.save_every < 0:
            raise ValueError(f"save_every must be >= 0 (0: never), got {self.save_every!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive, got {self.max_grad_norm!r}")
        _check_phases(self.warmup, self.cooldown)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        self.distill_temperature = distill_options(self.distill_weight, self.distill_temperature)
        self.reconstruct_lambda, self.reconstruct_samples = reconstruct_options(
            self.reconstruct, self.reconstruct_lambda, self.reconstruct_samples
        )
        lorashear.check_options(self)
        if self.mode == "iterative":
            self.schedule()

    def schedule(self) -> PruneSchedule:
        """The iterative mode's pruning schedule (with ``fade_steps``: its selections, compressed so that
        every chosen unit has faded out and is masked at the start of the cool-down)."""
        return PruneSchedule(self.steps, self.prune_every, self.warmup, self.cooldown, self.fade_steps)

    def prune_steps(self) -> list[int]:
        """Optimizer steps after which masks grow (none in one-shot mode)."""
        return [] if self.mode == "oneshot" else list(self.schedule().prune_steps)


def resolve_options(
    config: RunConfig, model: nn.Module, windows: torch.Tensor
) -> tuple[RunConfig, list[str]]:
    """``config`` with its automatic (``None``) refit decided for ``model`` and its token ``windows``,
    and a note where it is left off; an explicit setting is kept as it is."""
    notes = []
    refit, samples = config.reconstruct, config.reconstruct_samples
    devices = {str(d) for d in (getattr(unwrap_model(model), "hf_device_map", None) or {}).values()}
    if refit is not False and len(devices) > 1:  # one rule for the explicit and the automatic refit
        unsupported = "the refit of o_proj/down_proj is not supported over several devices (untested there)"
        if refit or samples is not None:
            raise ValueError(f"reconstruct: {unsupported}; the model is placed on {sorted(devices)}")
        refit = False
        notes.append(f"the refit is off: {unsupported}")
    elif refit is None:
        refit = True
        samples = min(DEFAULT_REFIT_SAMPLES, len(windows)) if samples is None else samples
    lam = config.reconstruct_lambda if refit else None
    resolved = replace(
        config,
        reconstruct=refit,
        reconstruct_lambda=lam,
        reconstruct_samples=samples if refit else None,
    )
    return resolved, notes


@dataclass
class RunSummary:
    steps_done: int
    finished: bool
    final_loss: float | None
    tokens_seen: int
    wall_time_s: float
    skipped_score_updates: int
    peak_memory_bytes: int
    peak_memory_kind: str
    # With rank pruning: the peak from the last rank removal on (in this process), i.e. at the final rank.
    peak_memory_after_rank_bytes: int | None = None


class PruningRun:
    """A LoRAPrune run over token windows, checkpointed to one safetensors file.

    Args:
        model: a loaded Hugging Face causal LM (on its device, in its weight dtype).
        windows: int64 token windows (n, seq_len).
        prune_config, run_config: what to prune and how to train.
        amp_dtype: autocast dtype (bf16/fp16) or ``None`` for none; fp16 adds loss scaling.
        checkpoint: path of the checkpoint file; ``None`` disables checkpoints.
        progress: show a progress bar.
        recovery_sources: LoRAShear's recovery (:mod:`loraprune.recovery`): token windows of more text
            sources by name; the cool-down then trains in stages on the source each stage's rule picks
            among ``windows`` (named ``data_name``) and these.
        data_name: the name of ``windows`` in checkpoints' settings and the report.
    """

    pruner_class: type[LoraPruner] = LoraPruner  # loraprune.distributed swaps in its subclass

    def __init__(
        self,
        model: nn.Module,
        windows: torch.Tensor,
        prune_config: LoraPruneConfig,
        run_config: RunConfig,
        *,
        seed: int = 0,
        amp_dtype: torch.dtype | None = None,
        checkpoint: Path | None = None,
        progress: bool = True,
        recovery_sources: dict[str, torch.Tensor] | None = None,
        data_name: str = "data",
    ) -> None:
        sources = recovery_sources or {}
        windows, self.heldout = lorashear.hold_out(run_config, windows, sources, data_name, seed)
        self.pruner = self.pruner_class(model, prune_config)
        self.model = self.pruner.model
        run_config, self.notes = resolve_options(run_config, self.model, windows)
        self.prune_config, self.run_config, self.seed = prune_config, run_config, seed
        self.device = next(self.model.parameters()).device
        self.sampler = self.main_sampler = WindowSampler(windows, run_config.batch_size, seed)
        self.amp_dtype = amp_dtype
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp_dtype == torch.float16)
        self.optimizer = torch.optim.AdamW(
            self.pruner.trainable_parameters(), lr=run_config.lr, weight_decay=run_config.weight_decay
        )
        self.checkpoint, self.progress = checkpoint, progress
        self.step = 0
        self.last_loss: float | None = None
        self.tokens_seen = 0
        self.elapsed = 0.0
        self.schedule = run_config.schedule() if run_config.mode == "iterative" else None
        self.rank_schedule: RankSchedule | None = None
        if self.pruner.rank is not None:
            self.rank_schedule = rank_schedule(
                run_config.steps,
                run_config.warmup,
                run_config.cooldown,
                self.pruner.rank.initial_r,
                prune_config.lora_final_r,
                prune_config.rank_prune_every,
                prune_config.rank_prune_count,
            )
        self.last_rank_step = max(self.rank_schedule.steps, default=0) if self.rank_schedule else 0
        self.peak_before_rank_final: int | None = None  # the peak up to the last rank removal
        self.distiller = None
        if run_config.distill_weight > 0:
            self.distiller = Distiller(self.model, run_config.distill_weight, run_config.distill_temperature)
        self.refit_windows = None  # drawn now: too few windows fail before anything runs
        if run_config.reconstruct:
            self.refit_windows = calibration_windows(windows, run_config.reconstruct_samples, seed)
        self.reconstruction: list[ConsumerRefit] = []
        self.fader: Fader | None = None
        if run_config.fade_steps:
            self.fader = Fader(self.pruner, run_config.fade_steps, run_config.fade_epsilon, self.schedule)
        self.protection: Protection | None = None
        start = run_config.fade_steps if self.schedule is None else self.schedule.end  # the cool-down's
        self.recovery = lorashear.build_recovery(
            run_config, windows, self.heldout, sources, data_name, seed, start
        )
        self.prepared = False  # prepare() done (or its results restored from a checkpoint)
        torch.manual_seed(seed)

    # -- LoRAShear's parts (loraprune.lorashear) ---------------------------------------------------
    def _agree(self, value):
        """A value computed on every process, as the first process computed it (data parallel overrides)."""
        return value

    def _heldout_losses(self, windows: list[torch.Tensor]) -> list[float]:
        return self._agree(
            [heldout_loss(self.model, w, self.run_config.batch_size, self.amp_dtype) for w in windows]
        )

    def prepare(self) -> None:
        """Before the first step: the knowledge-distribution analysis (``protect_fraction``) and the
        unpruned model's held-out losses (recovery). :meth:`run` calls it; the CLI calls it before it
        writes anything, so that a ``protect_fraction`` the ratio cannot reach fails first."""
        if self.prepared:
            return
        if self.run_config.protect_fraction > 0:
            self.protection = lorashear.protect(
                self.pruner, self.heldout, self.run_config, self.amp_dtype, self.progress, self._agree
            )
        if self.recovery is not None:
            self.recovery.dense = self._heldout_losses([s.heldout for s in self.recovery.sources])
        self.prepared = True

    def _before_step(self) -> None:
        """A recovery stage starting: choose its source; the step's batches come from that source."""
        if self.recovery is None:
            return
        if self.recovery.due(self.step):
            self.recovery.choose(self.step, self._heldout_losses([s.heldout for s in self.recovery.sources]))
        self.sampler = self.recovery.sampler(self.step) or self.main_sampler

    def method_report(self) -> dict:
        """What protection, fade and recovery did (``prune_report.json``'s ``protect``, ``fade``, ``recovery``)."""
        return lorashear.report(self.protection, self.fader, self.recovery, self.pruner.groups)

    # -- training ----------------------------------------------------------------------------
    @property
    def scoring(self) -> bool:
        """Importance is tracked until the last pruning step (one-shot: during calibration only)."""
        return self.schedule is not None and self.schedule.scoring(self.step)

    @property
    def rank_scoring(self) -> bool:
        """Rank components are scored until the last rank removal."""
        return self.step < self.last_rank_step

    def current_ratio(self) -> float:
        if self.schedule is None:
            return self.prune_config.ratio
        return self.schedule.ratio_after(self.step, self.prune_config.ratio)

    def _loss(
        self, model: nn.Module, batch: torch.Tensor, distill: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss to minimise on ``batch`` through ``model`` (the model or its DDP wrapper), and its
        cross-entropy: the same without distillation."""
        with torch.autocast(
            self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        ):
            if distill and self.distiller is not None:
                return self.distiller.loss(model, batch)
            loss = model(input_ids=batch, labels=batch).loss
            return loss, loss

    def _backward(self, batch_index: int, length: int | None = None, distill: bool = True) -> torch.Tensor:
        """Forward and backward of one micro-batch (its first ``length`` tokens); returns its
        (unscaled, undivided) cross-entropy on the device."""
        batch = self.sampler.batch(batch_index)[:, :length].to(self.device)
        loss, cross_entropy = self._loss(self.model, batch, distill)
        self.scaler.scale(loss / self.run_config.grad_accum).backward()
        self.tokens_seen += batch.numel()
        return cross_entropy.detach()

    def _calibrate(self) -> None:
        """One-shot scoring: importance over ``calib_batches`` batches, then prune to the target."""
        self.model.train()
        for index in range(self.run_config.calib_batches):
            self._backward(index, self.run_config.calib_seq_len, distill=False)
            self.scaler.unscale_(self.optimizer)
            self.pruner.update_scores()
            self.model.zero_grad(set_to_none=True)
            self.scaler.update()
        if self.fader is not None:  # every unit fades over the first fade_steps steps
            self.fader.select(self.prune_config.ratio, 0)
            self.fader.apply(0)
        else:
            self.pruner.prune(self.prune_config.ratio)
        self.pruner.finish_scoring()

    def _train_step(self) -> None:
        config = self.run_config
        calibration_offset = config.calib_batches if config.mode == "oneshot" else 0
        first = calibration_offset + self.step * config.grad_accum
        self.model.train()
        losses = [self._backward(first + m) for m in range(config.grad_accum)]
        self.scaler.unscale_(self.optimizer)
        if self.scoring:
            self.pruner.update_scores()
        if self.rank_scoring:
            self.pruner.update_rank_scores()
        torch.nn.utils.clip_grad_norm_(self.pruner.trainable_parameters(), config.max_grad_norm)
        if self.fader is not None:
            self.fader.before_update(self.step)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.model.zero_grad(set_to_none=True)
        self.step += 1
        self.last_loss = float(torch.stack(losses).mean())  # the step's one host synchronisation
        if self.fader is not None:
            self.fader.step_done(self.step)
        elif self.schedule is not None:
            self.schedule.step_done(self.pruner, self.step)
        if self.rank_schedule is not None and self.step in self.rank_schedule.steps:
            last = self.step == self.last_rank_step
            self.pruner.prune_rank(None if last else self.rank_schedule.count, self.optimizer)
            self._rank_changed()
            if last:
                self.peak_before_rank_final = _reset_peak_memory(self.device)

    def _rank_changed(self) -> None:
        """The LoRA factors changed shape (rank pruning); a wrapper that holds them rebuilds here."""

    def run(self, stop_after: int | None = None) -> RunSummary:
        """Train (and prune) up to ``steps``, or ``stop_after`` more steps; checkpoints as configured.

        A first Ctrl-C finishes the current step, writes a checkpoint and raises
        ``KeyboardInterrupt``; a second one interrupts at once.
        """
        config = self.run_config
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        target = config.steps if stop_after is None else min(config.steps, self.step + stop_after)
        started = time.perf_counter()
        with (
            _deferred_interrupt() as interrupted,
            tqdm(
                total=config.steps, initial=self.step, desc="prune", unit="step", disable=not self.progress
            ) as bar,
        ):
            self.prepare()
            fading = self.fader is not None and self.fader.started()
            if (
                config.mode == "oneshot"
                and self.step == 0
                and not self.pruner.masked_anything()
                and not fading
            ):
                self._calibrate()
            while self.step < target:
                self._before_step()
                tick = time.perf_counter()
                tokens_before = self.tokens_seen
                self._train_step()
                bar.update(1)
                bar.set_postfix(
                    loss=f"{self.last_loss:.3f}",
                    ratio=f"{self.current_ratio():.3f}",
                    tok_s=f"{(self.tokens_seen - tokens_before) / (time.perf_counter() - tick):.0f}",
                )
                if self.checkpoint and (
                    (config.save_every and self.step % config.save_every == 0)
                    or interrupted()
                    or self.step == target < config.steps
                ):
                    self.elapsed += time.perf_counter() - started
                    started = time.perf_counter()
                    self.save_checkpoint()
                if interrupted():
                    raise KeyboardInterrupt(f"interrupted after step {self.step}")
        if self.recovery is not None and self.step >= config.steps and self.recovery.final is None:
            self.recovery.final = self._heldout_losses([s.heldout for s in self.recovery.sources])
        self.elapsed += time.perf_counter() - started
        return self.summary()

    def compact(self) -> nn.Module:
        """The pruned model (:meth:`LoraPruner.compact`), o_proj and down_proj refit first with
        ``reconstruct`` (what each refit did: ``self.reconstruction``)."""
        if self.run_config.reconstruct:
            self.reconstruction = reconstruct(
                self.model, self.refit_windows, self.run_config.reconstruct_lambda, self.run_config.batch_size
            )
        return self.pruner.compact()

    def summary(self) -> RunSummary:
        peak, kind = _peak_memory(self.device)
        after_rank = None
        if self.peak_before_rank_final is not None:
            after_rank, peak = peak, max(peak, self.peak_before_rank_final)
        return RunSummary(
            self.step,
            self.step >= self.run_config.steps,
            self.last_loss,
            self.tokens_seen,
            self.elapsed,
            self.pruner.tracker.total_skipped(),
            peak,
            kind,
            after_rank,
        )

    # -- checkpoints ---------------------------------------------------------------------------
    @staticmethod
    def _default_settings() -> dict[str, dict]:
        return {"prune_config": LoraPruneConfig().to_dict(), "run_config": asdict(RunConfig())}

    def _settings(self) -> dict:
        run = asdict(self.run_config)
        # may change between sessions without changing the checkpointed state
        for key in ("save_every", "reconstruct", "reconstruct_lambda", "reconstruct_samples"):
            run.pop(key)
        settings = {
            "prune_config": self.prune_config.to_dict(),
            "run_config": run,
            "seed": self.seed,
            "amp_dtype": str(self.amp_dtype),
        }
        if self.recovery is not None:
            settings["recovery_sources"] = [source.name for source in self.recovery.sources]
        return settings

    def save_checkpoint(self) -> None:
        """Everything needed to continue bit-exactly, in one file replaced atomically."""
        tensors = pruning_state(self.pruner)
        optimizer_state = self.optimizer.state_dict()
        for index, state in optimizer_state["state"].items():
            tensors.update({f"optimizer.{index}.{k}": torch.as_tensor(v) for k, v in state.items()})
        method_tensors, method_metadata = lorashear.checkpoint_state(
            self.protection, self.fader, self.recovery
        )
        tensors.update(method_tensors)
        tensors["rng.cpu"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        metadata = {
            "step": self.step,
            "last_loss": self.last_loss,
            "tokens_seen": self.tokens_seen,
            "elapsed": self.elapsed,
            "settings": self._settings(),
            "optimizer_param_groups": optimizer_state["param_groups"],
            "scaler": self.scaler.state_dict(),
        }
        if method_metadata is not None:
            metadata["lorashear"] = method_metadata
        write_checkpoint_file(self.checkpoint, tensors, metadata)

    def load_checkpoint(self) -> None:
        """Restore a checkpoint written by a run with the same settings."""
        metadata, tensors = read_checkpoint_file(self.checkpoint)
        check_same_settings(metadata["settings"], self._settings(), self._default_settings())
        load_pruning_state(self.pruner, tensors, self.device)
        if self.pruner.rank is not None:
            self._rank_changed()
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value if name == "step" else value.to(self.device)
        self.optimizer.load_state_dict({"state": state, "param_groups": metadata["optimizer_param_groups"]})
        self.scaler.load_state_dict(metadata["scaler"])
        torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        self.step, self.last_loss = metadata["step"], metadata["last_loss"]
        self.tokens_seen, self.elapsed = metadata["tokens_seen"], metadata["elapsed"]
        self.protection = lorashear.load_checkpoint_state(
            metadata.get("lorashear"), tensors, self.fader, self.recovery, self.step
        )
        self.prepared = True
        if self.schedule is not None and not self.schedule.scoring(self.step):
            self.pruner.finish_scoring()
        fading = self.fader is not None and self.fader.started()
        if self.run_config.mode == "oneshot" and (self.pruner.masked_anything() or fading):
            self.pruner.finish_scoring()


def _peak_memory(device: torch.device) -> tuple[int, str]:
    """The process's peak memory so far: allocated CUDA memory, or the CPU's resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    try:  # VmHWM, unlike ru_maxrss of a multi-threaded process, follows a reset through clear_refs
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE).group(1)) * 1024, "cpu_vmhwm"
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_max_rss"


def _reset_peak_memory(device: torch.device) -> int:
    """Start a new peak from the current use (Linux: ``/proc/self/clear_refs``); returns the old peak."""
    peak, _ = _peak_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with contextlib.suppress(OSError):  # not Linux: the peak stays the whole run's
            Path("/proc/self/clear_refs").write_text("5")
    return peak


@contextlib.contextmanager
def _deferred_interrupt() -> Iterator:
    """Turn the first SIGINT into a flag checked between steps; the second one interrupts."""
    received = []

    def handler(signum, frame):
        if received:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        received.append(signum)

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield lambda: False
        return
    try:
        yield lambda: bool(received)
    finally:
        signal.signal(signal.SIGINT, previous)
