"""Data parallel pruning under ``torchrun``: DistributedDataParallel over the LoRA factors.

Every rank holds the whole (patched) model and takes its own slice of every global batch
(``batch_size`` stays the global batch and must split evenly). DDP all-reduces (averages) the
LoRA gradients during the backward, before the importance is updated, so every rank computes
the same ``lora`` scores and the same optimizer step; the criteria that collect importance
during the backward (``act``, ``taylor`` fused) have their accumulators summed over ranks
before each update. The masks are therefore identical on all ranks, which
:class:`DistributedPruner` checks at every pruning step (a fingerprint compared across ranks)
and fails loudly if not. With rank pruning (``lora_final_r``) the rank-component scores come from
the same all-reduced gradients, every removal is checked the same way, and DDP is rebuilt around
the narrowed factors. Only rank 0 writes checkpoints; every rank reads them on resume.

With equal windows per rank, the mean of the ranks' losses is the global batch's loss, so a
run on N processes computes, for every criterion, what one process computes with N times the
micro-batches (``batch_size / N``, ``grad_accum · N``), the ranks' slices in rank order, up to float
summation order (LoRA dropout excepted: each rank draws its own masks). All criteria but fused
``taylor`` also equal one process on the same global batch; fused ``taylor`` adds each rank's
``|dYᵀX ⊙ W'|`` as it adds micro-batches (``|·|`` of the sum would need every ``dYᵀX`` all-reduced).

    torchrun --nproc_per_node 2 -m loraprune.cli prune MODEL_DIR --data FILE ... --batch-size 8
"""

from __future__ import annotations

import atexit
import gc
import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from loraprune.pruner import LoraPruner
from loraprune.run import PruningRun


@dataclass(frozen=True)
class DataParallel:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_data_parallel() -> bool:
    """Whether this process is one of several started by ``torchrun`` (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_data_parallel(device: torch.device) -> DataParallel:
    """Join the process group ``torchrun`` set up: NCCL on CUDA, gloo on the CPU."""
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(dist.destroy_process_group)
    return DataParallel(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def mask_fingerprint(keep: list[torch.Tensor]) -> int:
    """A 63-bit digest of the unit keep-masks (equal on two ranks iff the masks are, barring collisions)."""
    digest = hashlib.sha256()
    for mask in keep:
        digest.update(mask.cpu().numpy().tobytes())
        digest.update(b"|")
    return int.from_bytes(digest.digest()[:8], "little") >> 1


class DistributedPruner(LoraPruner):
    """:class:`~loraprune.pruner.LoraPruner` for a DDP loop: importance collected during the
    backward is summed over ranks before each update, and every pruning step checks that all
    ranks chose the same masks. The LoRA gradients must already be all-reduced (DDP does it)."""

    def update_scores(self) -> None:
        world = dist.get_world_size()
        for capture in self.tracker.captures.values():
            # Each rank's gradient is that of its own mean loss, N times the global mean's share:
            # dividing by N (N² for the squared per-sequence form) gives the global batch's figure.
            dist.all_reduce(capture.buffer)
            if capture.criterion == "reconstruction":  # sums over every rank's tokens, divided by their count
                dist.all_reduce(capture.sums)
                dist.all_reduce(capture.tokens)
                continue
            scale = world**2 if capture.criterion == "act" and capture.squared else world
            capture.buffer.div_(scale)
        super().update_scores()

    def prune(self, ratio: float | None = None) -> None:
        super().prune(ratio)
        self.check_masks_agree()

    def prune_rank(self, count: int | None = None, optimizer: torch.optim.Optimizer | None = None) -> int:
        removed = super().prune_rank(count, optimizer)
        self.check_masks_agree()
        return removed

    def check_masks_agree(self, extra: list[torch.Tensor] = ()) -> None:
        """Raise on every rank unless all ranks hold the same masks, and the same ``extra`` bool tensors
        (a fade's chosen units), two scalar all-reduces."""
        device = self.tracker.scores[0].device if self.tracker.scores else torch.device("cpu")
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        kept = self.keep + list(extra) + (list(self.rank.kept.values()) if self.rank is not None else [])
        fingerprint = torch.tensor([mask_fingerprint(kept)], dtype=torch.int64, device=device)
        low, high = fingerprint.clone(), fingerprint.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        if not torch.equal(low, high):
            raise RuntimeError(
                f"rank {dist.get_rank()}: the pruning masks differ across the {dist.get_world_size()} "
                "ranks (scores diverged); the run cannot continue consistently"
            )


class DistributedPruningRun(PruningRun):
    """:class:`~loraprune.run.PruningRun` on every rank of a ``torchrun`` job (process group
    initialised, see :func:`init_data_parallel`); pass ``progress`` and ``checkpoint`` as on
    rank 0: only rank 0 shows progress and writes checkpoints."""

    pruner_class = DistributedPruner

    def __init__(self, model: nn.Module, windows: torch.Tensor, prune_config, run_config, **kwargs) -> None:
        world_size = dist.get_world_size()
        if run_config.batch_size % world_size:
            raise ValueError(
                f"batch_size ({run_config.batch_size}) must split evenly over the {world_size} processes"
            )
        if prune_config.criterion == "taylor" and prune_config.taylor_impl == "materialized":
            raise ValueError(
                "taylor_impl 'materialized' is not supported under data parallel (it would all-reduce "
                "an out×in gradient per matrix); use taylor_impl 'fused'"
            )
        self.rank, self.world_size = dist.get_rank(), world_size
        if self.rank:
            kwargs["progress"] = False
        super().__init__(model, windows, prune_config, run_config, **kwargs)
        self.data_parallel_model: DistributedDataParallel | None = None
        self._wrap()

    def _wrap(self) -> None:
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # DDP registers the trainable parameters (the LoRA factors) and averages their gradients.
        self.data_parallel_model = DistributedDataParallel(self.model, device_ids=device_ids)

    def _rank_changed(self) -> None:
        """DDP's gradient buckets are sized for the factors' old shapes: drop the wrapper (its reducer
        removes its autograd hooks) and wrap the narrowed model again. The rank-component scores came
        from the all-reduced gradients, so every rank removed the same components."""
        self.data_parallel_model = None
        gc.collect()
        self._wrap()

    def _backward(self, batch_index: int, length: int | None = None, distill: bool = True) -> torch.Tensor:
        """This rank's slice of the global micro-batch (its first ``length`` tokens); returns the
        global batch's mean cross-entropy. With distillation each rank's teacher is its own model's
        base (a forward outside DDP, without gradients)."""
        batch = self.sampler.batch(batch_index)[:, :length]
        share = len(batch) // self.world_size
        local = batch[self.rank * share : (self.rank + 1) * share].to(self.device)
        # Dropout masks (the only randomness in the loop) from (seed, batch, rank): resumable, and
        # not the same masks on every rank.
        torch.manual_seed((self.seed * 1_000_003 + batch_index) * 65_537 + self.rank)
        loss, cross_entropy = self._loss(self.data_parallel_model, local, distill)
        self.scaler.scale(loss / self.run_config.grad_accum).backward()
        self.tokens_seen += batch.numel()
        cross_entropy = cross_entropy.detach().clone()
        dist.all_reduce(cross_entropy)
        return cross_entropy / self.world_size

    def _agree(self, value):
        """Rank 0's value on every rank (LoRAShear's protection and recovery choices are computed on every
        rank from the same weights; taking rank 0's rules out a tie broken differently)."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def save_checkpoint(self) -> None:
        if self.rank == 0:
            super().save_checkpoint()
        dist.barrier()  # no rank runs ahead of the checkpoint it may have to resume from


__all__ = [
    "DataParallel",
    "DistributedPruner",
    "DistributedPruningRun",
    "init_data_parallel",
    "launched_data_parallel",
    "mask_fingerprint",
]
