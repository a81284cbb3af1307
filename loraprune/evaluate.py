"""Perplexity on non-overlapping windows, and an optional bridge to lm-evaluation-harness."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from loraprune.data import read_text, tokenize, windows


@dataclass
class PerplexityReport:
    dataset: str
    perplexity: float
    seq_len: int
    windows: int
    tokens: int  # tokens scored (each window predicts seq_len − 1)
    dtype: str

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer,
    data: str | os.PathLike,
    *,
    seq_len: int = 512,
    max_windows: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> PerplexityReport:
    """``exp`` of the mean next-token loss over the first ``max_windows`` (default: all) windows.

    Runs in the model's dtype on its device; padding-free, every window is full.
    """
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1, got {max_windows}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chunks = windows(tokenize(tokenizer, read_text(data)), seq_len)[:max_windows]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_loss, total_tokens = 0.0, 0
    for start in tqdm(range(0, len(chunks), batch_size), desc="eval", disable=not progress, leave=False):
        batch = chunks[start : start + batch_size].to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        loss = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_loss += float(loss)
        total_tokens += batch[:, 1:].numel()
    model.train(was_training)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return PerplexityReport(
        str(data), math.exp(total_loss / total_tokens), seq_len, len(chunks), total_tokens, dtype
    )


def lm_eval_tasks(
    model: nn.Module, tokenizer, tasks: list[str], *, batch_size: int = 8, limit: int | None = None
) -> dict:
    """Zero-shot accuracy through lm-evaluation-harness (``pip install lm_eval``; it downloads its tasks)."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise ImportError(
            "tasks: zero-shot evaluation needs lm-evaluation-harness (pip install lm_eval)"
        ) from None
    harness_model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    return simple_evaluate(model=harness_model, tasks=tasks, limit=limit)["results"]
