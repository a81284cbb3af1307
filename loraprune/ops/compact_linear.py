"""Compaction of one linear: ``W' = (W + s·B·A)[rows][:, cols]``, ``b' = b[rows]``.

The merge accumulates in float32 and writes the smaller dense matrix in ``W``'s dtype, so the
compacted layer computes what the masked LoRA layer computed, up to one rounding.
"""

from __future__ import annotations

import torch

from loraprune.ops._checks import FLOAT_DTYPES, check_scalar, check_tensor
from loraprune.ops._dispatch import resolve

IMPLEMENTATIONS = {
    "cuda": "loraprune.ops.cuda:compact_linear",
    "torch": "loraprune.ops.compact_linear:compact_linear_reference",
}


def validate(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scaling: float,
    rows: torch.Tensor | None,
    cols: torch.Tensor | None,
) -> None:
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES)
    out_features, in_features = weight.shape
    device = weight.device
    if bias is not None:
        check_tensor("bias", bias, shape=(out_features,), dtypes=FLOAT_DTYPES, device=device)
    if (lora_a is None) != (lora_b is None):
        raise ValueError("lora_a and lora_b must be given together (or both None for a plain slice)")
    if lora_a is not None:
        check_tensor("lora_a", lora_a, ndim=2, dtypes=FLOAT_DTYPES, device=device)
        rank = lora_a.shape[0]
        check_tensor("lora_a", lora_a, shape=(rank, in_features))
        check_tensor("lora_b", lora_b, shape=(out_features, rank), dtypes=FLOAT_DTYPES, device=device)
    check_scalar("scaling", scaling)
    for name, index, size in (("rows", rows, out_features), ("cols", cols, in_features)):
        if index is None:
            continue
        check_tensor(name, index, ndim=1, dtypes=(torch.int64,), device=device)
        if index.numel() == 0:
            raise ValueError(f"{name} must keep at least one index")
        if int(index.min()) < 0 or int(index.max()) >= size:
            raise ValueError(f"{name} holds indices outside [0, {size})")


def compact_linear_reference(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scaling: float,
    rows: torch.Tensor | None = None,
    cols: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    merged = weight.float()
    if lora_a is not None:
        merged = merged + scaling * (lora_b.float() @ lora_a.float())
    if rows is not None:
        merged = merged.index_select(0, rows)
    if cols is not None:
        merged = merged.index_select(1, cols)
    new_bias = None if bias is None else (bias if rows is None else bias.index_select(0, rows)).clone()
    return merged.to(weight.dtype).contiguous(), new_bias


def compact_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scaling: float,
    rows: torch.Tensor | None = None,
    cols: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Merge LoRA into ``weight`` and keep only ``rows`` (int64, out side) and ``cols`` (in side).

    ``lora_a``/``lora_b`` ``None`` gives a plain slice; ``rows``/``cols`` ``None`` keeps all.
    Returns the new contiguous weight in ``weight.dtype`` and the sliced bias (or ``None``).
    """
    validate(weight, bias, lora_a, lora_b, scaling, rows, cols)
    _, impl = resolve("compact_linear", IMPLEMENTATIONS, weight.device, backend)
    return impl(weight, bias, lora_a, lora_b, float(scaling), rows, cols)
