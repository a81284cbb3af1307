"""Prune inside a transformers ``Trainer`` (or TRL's ``SFTTrainer``): :class:`LoraPruneCallback`.

The callback runs :class:`~loraprune.run.PruningRun`'s procedure inside the user's own fine-tuning
(their data collator, chat template, scheduler, logging and launcher):

- **When the model is patched.** At the end of the ``Trainer``'s constructor (``on_init_end``): the
  ``Trainer`` has put the model on its device and has not made its optimizer yet (``train()`` makes
  it), so the optimizer is built over the patched LoRA factors. A PEFT model's LoRA adapters on the
  projections are taken over then (their ``A``, ``B`` and scaling copied into the patched
  projections, before any optimizer state exists); the projections without one get fresh factors, as
  ``PruningRun`` gives them. An optimizer handed to the ``Trainer`` (``optimizers=``) was made before
  the patch, over other parameters, and is refused; ``optimizer_cls_and_kwargs`` is fine.
- **Scores and clipping.** ``on_pre_optimizer_step`` runs after the ``Trainer`` has clipped the
  gradients, while ``PruningRun`` scores before clipping. The callback follows ``PruningRun``: for the
  run it sets ``args.max_grad_norm`` to 0 (the ``Trainer`` then only measures the norm, which also
  unscales fp16 gradients, and still logs the pre-clip ``grad_norm``), scores the unclipped
  gradients and clips the LoRA factors to the original ``max_grad_norm`` itself;
  ``args.max_grad_norm`` is restored at the end of training.
- **Gradient accumulation.** Importance moves once per optimizer step, from the accumulated LoRA
  gradients (``lora``) or the micro-batches' importance summed during their backward passes
  (``taylor`` fused, ``act``), as in ``PruningRun``; the schedule counts optimizer steps
  (``state.global_step``) over ``state.max_steps``.
- **Masks** grow in ``on_step_end`` on :class:`~loraprune.run.PruneSchedule`; the current ratio and
  the masked units are added to the ``Trainer``'s logs (``on_log``).
- **Checkpoints.** ``on_save`` writes ``loraprune_state.safetensors`` into the ``Trainer``'s
  checkpoint folder: the LoRA factors the callback owns (a PEFT model's adapter file no longer holds
  them), the masks and moving averages, the step and the settings. Resuming
  (``trainer.train(resume_from_checkpoint=...)`` with a new model and callback) restores them in
  ``on_train_begin``, in place, after the ``Trainer`` has loaded its optimizer state into the same
  factors.
- **Data parallel** (``torchrun`` / ``accelerate launch``, DDP): the ``Trainer`` all-reduces the
  LoRA gradients; the callback uses :class:`~loraprune.distributed.DistributedPruner` (importance
  collected during the backward summed over ranks, masks checked equal on every pruning step), as
  ``DistributedPruningRun`` does. FSDP and DeepSpeed (they shard or take over the weights and
  gradients) are refused.
- **Not here:** distillation, the refit of o_proj/down_proj and LoRAShear's parts (``RunConfig``'s
  ``distill_weight``, ``reconstruct``, ``protect_fraction``, ``fade_steps`` and the recovery sources,
  :mod:`loraprune.distill`, :mod:`loraprune.refit`, :mod:`loraprune.lorashear`) belong to ``PruningRun``'s
  loop; the callback takes a ``LoraPruneConfig``, which holds none of them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from loraprune.checkpoint import (
    check_same_settings,
    load_pruning_state,
    pruning_state,
    read_checkpoint_file,
    write_checkpoint_file,
)
from loraprune.config import LoraPruneConfig
from loraprune.distributed import DistributedPruner, launched_data_parallel
from loraprune.pruner import LoraPruner
from loraprune.run import PruneSchedule
from loraprune.structures import build_groups, unwrap_model

STATE_FILE = "loraprune_state.safetensors"
logger = logging.getLogger(__name__)


class LoraPruneCallback(TrainerCallback):
    """Prunes ``model`` while a ``Trainer`` fine-tunes it (see the module docstring).

    Args:
        model: the Hugging Face causal LM, or PEFT model, that is handed to the ``Trainer``.
        config: what to prune (ratio, criterion, layers, LoRA of the projections without a PEFT adapter).
        prune_every, warmup, cooldown: the schedule over the ``Trainer``'s ``max_steps`` optimizer
            steps, as ``loraprune prune``'s options of the same names.
        output_dir: where to write the compacted model (and the ``Trainer``'s tokenizer) at the end of
            training; ``None``: call :meth:`compact` yourself.
    """

    def __init__(
        self,
        model: nn.Module,
        config: LoraPruneConfig,
        *,
        prune_every: int = 10,
        warmup: float = 0.1,
        cooldown: float = 0.1,
        output_dir: str | os.PathLike | None = None,
    ) -> None:
        if not isinstance(config, LoraPruneConfig):
            raise TypeError(f"config must be a LoraPruneConfig, got {type(config).__name__}")
        if config.lora_final_r is not None:
            raise ValueError(
                "LoraPruneCallback: lora_final_r (rank pruning) is not supported inside a Trainer: it "
                "narrows the LoRA factors, which the Trainer's DDP wrapper and its model checkpoints do "
                "not follow; use loraprune prune"
            )
        if config.taylor_impl == "materialized":
            raise ValueError(
                "LoraPruneCallback: taylor_impl 'materialized' makes the frozen weights require "
                "gradients, which the Trainer's optimizer would then train; use taylor_impl 'fused'"
            )
        build_groups(unwrap_model(model), config)  # an unsupported model or no layer to prune fails now
        PruneSchedule(prune_every, prune_every, warmup, cooldown)  # checks the schedule's settings
        self.model, self.config = model, config
        self.prune_every, self.warmup, self.cooldown = prune_every, warmup, cooldown
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.pruner: LoraPruner | None = None
        self.pruned: nn.Module | None = None  # the compacted model, once made
        self.schedule: PruneSchedule | None = None
        self.steps_done = 0
        self.max_grad_norm: float | None = None  # the Trainer's, while the callback clips in its place

    # -- checks --------------------------------------------------------------------------------
    def _check_trainer(self, args, model: nn.Module) -> None:
        if unwrap_model(model) is not unwrap_model(self.model):
            raise ValueError(
                f"LoraPruneCallback was built for another model than the Trainer's ({type(model).__name__} "
                f"at {id(model):#x}): build the callback with the model you hand the Trainer"
            )
        engine = _sharding_engine(args, model)
        if engine is not None:
            raise ValueError(
                f"LoraPruneCallback does not support {engine}: it shards or takes over the weights and "
                "gradients that the masks and importance read whole; use data parallel (DDP: torchrun, or "
                "accelerate launch without an FSDP or DeepSpeed config)"
            )
        if args.load_best_model_at_end:
            raise ValueError(
                "LoraPruneCallback: load_best_model_at_end would reload a checkpoint's weights behind the "
                "callback's masks; leave it False (the schedule decides the final model)"
            )

    # -- Trainer events ------------------------------------------------------------------------
    def on_init_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._check_trainer(args, model)
        if optimizer is not None:
            raise ValueError(
                "LoraPruneCallback patches the model when the Trainer is built, after the optimizer you "
                "passed (optimizers=) was made over other parameters; let the Trainer make it "
                "(optimizer_cls_and_kwargs= chooses its class)"
            )
        pruner_class = DistributedPruner if launched_data_parallel() else LoraPruner
        self.pruner = pruner_class(model, self.config)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.pruner is None:
            raise RuntimeError(
                "LoraPruneCallback missed the Trainer's construction: pass it as Trainer(callbacks=[...]) "
                "(trainer.add_callback comes too late: the optimizer must see the patched model)"
            )
        self._check_trainer(args, model)
        trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if trained != {id(p) for p in self.pruner.trainable_parameters()}:
            raise ValueError(
                "LoraPruneCallback: the Trainer's optimizer does not train exactly the patched LoRA "
                "factors (was it made before the Trainer, or over other parameters?)"
            )
        try:
            self.schedule = PruneSchedule(state.max_steps, self.prune_every, self.warmup, self.cooldown)
        except ValueError as exc:
            raise ValueError(f"LoraPruneCallback: the Trainer's max_steps: {exc}") from None
        if state.global_step != self.steps_done:
            self._resume(args, state)
        # The callback scores the unclipped gradients, then clips (see the module docstring).
        self.max_grad_norm, args.max_grad_norm = args.max_grad_norm, 0.0

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.schedule.scoring(state.global_step):
            self.pruner.update_scores()
        if self.max_grad_norm and self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.pruner.trainable_parameters(), self.max_grad_norm)

    def on_step_end(self, args, state, control, **kwargs):
        self.steps_done = state.global_step
        self.schedule.step_done(self.pruner, self.steps_done)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.schedule is None or logs is None:
            return
        figures = {"prune_ratio": self.schedule.ratio_after(self.steps_done, self.config.ratio)}
        for status in self.pruner.status():
            key = f"masked_{status.kind}_units"
            figures[key] = figures.get(key, 0) + status.total - status.kept
        logs.update(figures)
        if state.log_history:  # the Trainer recorded the logs before handing them to the callbacks
            state.log_history[-1].update(figures)

    def on_save(self, args, state, control, **kwargs):
        if not args.should_save:
            return
        folder = _checkpoint_folder(args.output_dir, state.global_step)
        if not folder.is_dir():
            raise FileNotFoundError(f"LoraPruneCallback: the Trainer's checkpoint folder {folder} is missing")
        metadata = {"step": state.global_step, "settings": self._settings()}
        write_checkpoint_file(folder / STATE_FILE, pruning_state(self.pruner), metadata)

    def on_train_end(self, args, state, control, processing_class=None, **kwargs):
        if self.max_grad_norm is not None:
            args.max_grad_norm, self.max_grad_norm = self.max_grad_norm, None
        if self.output_dir is None:
            return
        if self.schedule.scoring(self.steps_done):
            logger.warning(
                "LoraPruneCallback: training stopped after %d of %d steps, before the schedule reached "
                "ratio %s (it reached %s); writing that model to %s",
                self.steps_done,
                self.schedule.steps,
                self.config.ratio,
                self.schedule.ratio_after(self.steps_done, self.config.ratio),
                self.output_dir,
            )
        pruned = self.compact()
        if state.is_world_process_zero:
            pruned.save_pretrained(self.output_dir)
            if processing_class is not None:
                processing_class.save_pretrained(self.output_dir)

    # -- results and state ---------------------------------------------------------------------
    def compact(self) -> nn.Module:
        """The pruned model: masked heads and channels removed, LoRA merged (in place, once; a Hugging
        Face model that ``save_pretrained`` writes and the Auto classes load after ``import loraprune``)."""
        if self.pruner is None:
            raise RuntimeError("LoraPruneCallback.compact: no Trainer has been built with this callback")
        if self.pruned is None:
            self.pruned = self.pruner.compact()
        return self.pruned

    def _settings(self) -> dict:
        return {"prune_config": self.config.to_dict(), "schedule": asdict(self.schedule)}

    def _resume(self, args, state) -> None:
        """Restore the state saved with the checkpoint the Trainer resumed from (``on_train_begin``)."""
        if self.steps_done:
            raise RuntimeError(
                f"LoraPruneCallback has already pruned this model for {self.steps_done} steps; resume "
                f"from step {state.global_step} with a freshly loaded model and a new callback"
            )
        candidates = [_checkpoint_folder(args.output_dir, state.global_step) / STATE_FILE]
        if isinstance(args.resume_from_checkpoint, str):
            candidates.insert(0, Path(args.resume_from_checkpoint) / STATE_FILE)
        found = [path for path in candidates if path.is_file()]
        if not found:
            raise FileNotFoundError(
                f"LoraPruneCallback: the Trainer resumes at step {state.global_step}, but no "
                f"{STATE_FILE} is in {' or '.join(str(p.parent) for p in candidates)} (resume from a "
                "checkpoint in args.output_dir written with this callback)"
            )
        metadata, tensors = read_checkpoint_file(found[0])
        if metadata["step"] != state.global_step:
            raise ValueError(
                f"LoraPruneCallback: {found[0]} was written at step {metadata['step']}, the Trainer "
                f"resumes at step {state.global_step}"
            )
        check_same_settings(
            metadata["settings"],
            self._settings(),
            {"prune_config": LoraPruneConfig().to_dict(), "schedule": {}},
        )
        device = next(iter(self.pruner.trainable_parameters())).device
        load_pruning_state(self.pruner, tensors, device)
        self.steps_done = state.global_step
        if not self.schedule.scoring(self.steps_done):
            self.pruner.finish_scoring()


def _checkpoint_folder(output_dir: str, step: int) -> Path:
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    return Path(output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"


def _sharding_engine(args, model: nn.Module) -> str | None:
    """What shards ``model``'s weights under the Trainer (FSDP, DeepSpeed, parameters loaded as
    DTensors), or ``None``: the Trainer's arguments and ``accelerate launch``'s environment."""
    from torch.distributed.tensor import DTensor

    if args.fsdp or _env_flag("ACCELERATE_USE_FSDP"):
        return "FSDP"
    if args.deepspeed or _env_flag("ACCELERATE_USE_DEEPSPEED"):
        return "DeepSpeed"
    if any(isinstance(p, DTensor) for p in model.parameters()):
        return "parameters sharded as DTensors"
    return None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


__all__ = ["STATE_FILE", "LoraPruneCallback"]
