"""Distillation from the unpruned model while the pruned one fine-tunes (``distill_weight``).

The loss of every fine-tuning step (iterative pruning and recovery; one-shot calibration scores
the plain cross-entropy) becomes ``(1−α)·CE + α·T²·KL(teacher ‖ student)``, the KL of the
temperature-``T`` softmaxes averaged over the tokens the cross-entropy averages (every position
but the last of a window). In iterative mode the importance is scored on the gradient of that loss.

The teacher is the same patched model with every :class:`~loraprune.nn.LoraPruneLinear` computing
its frozen base alone (``base_only``: masks lifted, LoRA off), in eval mode: no second copy of the
weights, one extra forward without gradients per micro-batch, and no random draw (a resumed run
stays bit-identical). It keeps only its final hidden states (tokens × hidden); its logits are made
a chunk of tokens at a time (``CHUNK_ELEMENTS`` logits) inside one autograd function whose backward
recomputes them, so neither the teacher's logits nor the softmaxes exist whole; the student's
gradient is one logits-sized tensor, as the cross-entropy's is. The teacher is the model as
patched only if LoRA starts at zero: an adapter taken over from PEFT (``B ≠ 0``) would be switched
off in the teacher, so that is refused.

Off by default: in the real-model study (README, "The real model") it did not lower perplexity, alone or
with the refit, at the cost of one more forward a step.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from loraprune.nn import eval_mode, lora_modules
from loraprune.structures import unwrap_model

DEFAULT_TEMPERATURE = 1.0
CHUNK_ELEMENTS = 1 << 22  # logits per chunk: 16 MiB in fp32 per temporary (a few live at once)


def distill_options(weight: float, temperature: float | None) -> float | None:
    """The checked ``distill_temperature`` (1.0 by default with distillation; setting it with
    ``distill_weight`` 0 is an error)."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 <= weight <= 1.0:
        raise ValueError(f"distill_weight must be in [0, 1], got {weight!r}")
    if weight == 0:
        if temperature is not None:
            raise ValueError("distill_temperature needs distill_weight > 0 (distillation is off)")
        return None
    temperature = DEFAULT_TEMPERATURE if temperature is None else temperature
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not (math.isfinite(temperature) and temperature > 0)
    ):
        raise ValueError(f"distill_temperature must be a positive number, got {temperature!r}")
    return float(temperature)


@contextlib.contextmanager
def teacher_mode(model: nn.Module) -> Iterator[None]:
    """Within: the patched ``model`` computes its frozen base (no masks, no LoRA), in eval mode."""
    modules = list(lora_modules(model).values())
    with eval_mode(model):
        for module in modules:
            module.base_only = True
        try:
            yield
        finally:
            for module in modules:
                module.base_only = False


def check_teacher(model: nn.Module) -> None:
    """Refuse distillation where the base with LoRA off is not the model being pruned."""
    trained = [p for p, m in lora_modules(model).items() if m.lora_B is not None and bool(m.lora_B.any())]
    if trained:
        raise ValueError(
            f"distill_weight: the teacher is the frozen base with LoRA off, but {trained[0]} (and "
            f"{len(trained) - 1} more) already holds a trained adapter (B ≠ 0, e.g. a PEFT adapter taken over), "
            "so the teacher would not be the model being pruned; merge the adapter into the base first "
            "(PEFT's merge_and_unload)"
        )


@torch.no_grad()
def teacher_hidden_states(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The teacher's final hidden states (batch × seq × hidden), before the output head."""
    model = unwrap_model(model)
    with teacher_mode(model):
        return model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state


def _teacher_log_probs(hidden: torch.Tensor, head: nn.Linear, temperature: float) -> torch.Tensor:
    # autocast off: the forward and the backward's recomputation give the same teacher
    with torch.autocast(hidden.device.type, enabled=False):
        logits = F.linear(hidden.to(head.weight.dtype), head.weight, head.bias)
        return F.log_softmax(logits.float() / temperature, dim=-1)


class _ChunkedKL(torch.autograd.Function):
    """Σ over chunks of ``KL(teacher ‖ student)``; the backward recomputes each chunk's softmaxes and
    writes the student's gradient ``(softmax(s/T) − p_teacher)/T`` into one tensor."""

    @staticmethod
    def forward(ctx, student, hidden, head, temperature, positions, chunk_tokens):
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for row, span in _chunks(student.shape[0], positions, chunk_tokens):
            teacher = _teacher_log_probs(hidden[row, span], head, temperature)
            log_student = F.log_softmax(student[row, span].float() / temperature, dim=-1)
            total += F.kl_div(log_student, teacher, log_target=True, reduction="sum")
        ctx.save_for_backward(student, hidden)
        ctx.head, ctx.temperature, ctx.positions, ctx.chunk_tokens = (
            head,
            temperature,
            positions,
            chunk_tokens,
        )
        return total

    @staticmethod
    def backward(ctx, grad_total):
        student, hidden = ctx.saved_tensors
        grad = torch.zeros_like(student)
        for row, span in _chunks(student.shape[0], ctx.positions, ctx.chunk_tokens):
            teacher = _teacher_log_probs(hidden[row, span], ctx.head, ctx.temperature).exp_()
            chunk = F.softmax(student[row, span].float() / ctx.temperature, dim=-1).sub_(teacher)
            grad[row, span] = chunk.mul_(grad_total / ctx.temperature)
        return grad, None, None, None, None, None


def _chunks(batch: int, positions: int, chunk_tokens: int):
    for row in range(batch):
        for start in range(0, positions, chunk_tokens):
            yield row, slice(start, min(start + chunk_tokens, positions))


def kl_divergence(
    student_logits: torch.Tensor,
    teacher_hidden: torch.Tensor,
    head: nn.Linear,
    temperature: float,
    chunk_tokens: int,
    positions: int | None = None,
) -> torch.Tensor:
    """Mean over tokens of ``KL(softmax(head(h)/T) ‖ softmax(s/T))`` (fp32), for student logits
    (batch × seq × vocab) and teacher hidden states (batch × seq × hidden), over each sequence's first
    ``positions`` tokens (``None``: all), ``chunk_tokens`` tokens of one sequence at a time: the
    teacher's logits and the softmaxes never exist whole, in the forward or the backward."""
    batch, length = student_logits.shape[:2]
    positions = length if positions is None else positions
    total = _ChunkedKL.apply(student_logits, teacher_hidden, head, temperature, positions, chunk_tokens)
    return total / (batch * positions)


class Distiller:
    """The distillation loss of a patched causal LM against itself as the teacher."""

    def __init__(self, model: nn.Module, weight: float, temperature: float) -> None:
        check_teacher(model)
        self.model = unwrap_model(model)
        self.weight, self.temperature = weight, temperature
        self.head = self.model.get_output_embeddings()
        self.chunk_tokens = max(1, CHUNK_ELEMENTS // self.head.weight.shape[0])

    def loss(self, student: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(1−α)·CE + α·T²·KL`` and the CE, for ``student`` (the model, or a wrapper such as DDP)."""
        hidden = teacher_hidden_states(self.model, input_ids)
        output = student(input_ids=input_ids, labels=input_ids)
        # the positions the cross-entropy scores: all but each window's last
        positions = input_ids.shape[1] - 1
        kl = kl_divergence(output.logits, hidden, self.head, self.temperature, self.chunk_tokens, positions)
        total = (1 - self.weight) * output.loss + self.weight * self.temperature**2 * kl
        return total, output.loss


__all__ = [
    "Distiller",
    "check_teacher",
    "distill_options",
    "kl_divergence",
    "teacher_hidden_states",
    "teacher_mode",
]
