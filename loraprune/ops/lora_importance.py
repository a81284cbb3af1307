"""LoRA-guided importance of a frozen weight, reduced to row and column sums.

For a LoRA linear with frozen ``W`` (out×in), factors ``A`` (r×in), ``B`` (out×r) and their
gradients ``gA``, ``gB``, the gradient of ``W`` is estimated from one step of the factors
(LoRAPrune, eq. 7–8) without ever forming ``∂L/∂W``::

    G = gB·A + B·gA − gB·gA
    I = |G ⊙ (W + s·B·A)|          (or its square)

and ``I`` is reduced to per-row sums (out,) and per-column sums (in,). This reference
materialises ``G`` and ``I`` (a block of rows at a time for a quantized ``W``, which it
dequantizes block by block); the fused kernels never form an out×in temporary.
"""

from __future__ import annotations

import torch

from loraprune.ops._checks import FLOAT_DTYPES, check_scalar, check_tensor, check_weight
from loraprune.ops._dispatch import resolve
from loraprune.ops.quantized_weight import QuantizedWeight

# Elements of a quantized W the reference dequantizes at a time (fp32: 4 MiB).
REFERENCE_BLOCK_ELEMENTS = 1 << 20

# The Triton kernel holds the whole (padded) rank in one tile; the CUDA kernel streams any rank.
TRITON_MAX_RANK = 128
IMPLEMENTATIONS = {
    "cuda": "loraprune.ops.cuda:lora_importance",
    "triton": "loraprune.kernels.lora_importance:lora_importance",
    "torch": "loraprune.ops.lora_importance:lora_importance_reference",
}


def validate(
    weight: torch.Tensor | QuantizedWeight,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    grad_a: torch.Tensor,
    grad_b: torch.Tensor,
    scaling: float,
) -> None:
    out_features, in_features, device = check_weight("weight", weight)
    check_tensor("lora_a", lora_a, ndim=2, dtypes=FLOAT_DTYPES, device=device)
    rank = lora_a.shape[0]
    if rank < 1:
        raise ValueError(f"lora_a must have rank >= 1 rows, got shape {tuple(lora_a.shape)}")
    check_tensor("lora_a", lora_a, shape=(rank, in_features))
    check_tensor("lora_b", lora_b, shape=(out_features, rank), dtypes=FLOAT_DTYPES, device=device)
    check_tensor("grad_a", grad_a, shape=(rank, in_features), dtypes=FLOAT_DTYPES, device=device)
    check_tensor("grad_b", grad_b, shape=(out_features, rank), dtypes=FLOAT_DTYPES, device=device)
    check_scalar("scaling", scaling)


def lora_importance_reference(
    weight: torch.Tensor | QuantizedWeight,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    grad_a: torch.Tensor,
    grad_b: torch.Tensor,
    scaling: float,
    squared: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The specification: fp32 throughout, full-size temporaries allowed (a quantized ``W`` is
    dequantized ``REFERENCE_BLOCK_ELEMENTS`` at a time, never whole)."""
    if isinstance(weight, QuantizedWeight):
        out_features, in_features = weight.shape
        rows = torch.empty(out_features, dtype=torch.float32, device=weight.device)
        cols = torch.zeros(in_features, dtype=torch.float32, device=weight.device)
        step = max(1, REFERENCE_BLOCK_ELEMENTS // max(in_features, 1))
        for start in range(0, out_features, step):
            block = slice(start, min(start + step, out_features))
            block_rows, block_cols = lora_importance_reference(
                weight.dequantize_rows(block), lora_a, lora_b[block], grad_a, grad_b[block], scaling, squared
            )
            rows[block] = block_rows
            cols += block_cols
        return rows, cols
    a, b, ga, gb = (t.float() for t in (lora_a, lora_b, grad_a, grad_b))
    estimated_grad = gb @ a + b @ ga - gb @ ga
    merged = weight.float() + scaling * (b @ a)
    element = estimated_grad * merged
    element = element.square() if squared else element.abs()
    return element.sum(dim=1), element.sum(dim=0)


def lora_importance(
    weight: torch.Tensor | QuantizedWeight,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    grad_a: torch.Tensor,
    grad_b: torch.Tensor,
    scaling: float,
    *,
    squared: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row sums (out,) and column sums (in,) of the LoRA-guided importance, in float32.

    Args:
        weight: frozen weight ``W`` (out×in), fp16/bf16/fp32, or a :class:`QuantizedWeight`
            (int8/nf4/fp4, dequantized as it is loaded).
        lora_a, lora_b: LoRA factors ``A`` (r×in) and ``B`` (out×r).
        grad_a, grad_b: their gradients (unscaled: after a loss scaler's ``unscale_``).
        scaling: LoRA scaling ``s = alpha / r``.
        squared: use ``(G ⊙ W')²`` instead of ``|G ⊙ W'|``.
        backend: force ``"torch"``, ``"triton"`` or ``"cuda"`` (default: automatic, see ``loraprune.ops``).
    """
    validate(weight, lora_a, lora_b, grad_a, grad_b, scaling)
    rank = lora_a.shape[0]
    unsupported = (
        {"triton": f"its kernel takes rank <= {TRITON_MAX_RANK}, got {rank}"}
        if rank > TRITON_MAX_RANK
        else None
    )
    _, impl = resolve("lora_importance", IMPLEMENTATIONS, weight.device, backend, unsupported)
    return impl(weight, lora_a, lora_b, grad_a, grad_b, float(scaling), squared)
