"""First-order Taylor importance of a frozen weight without its gradient, reduced to rows and columns.

LLM-Pruner's element criterion ``|∂L/∂W ⊙ W'|`` with ``W' = W + s·B·A`` needs ``∂L/∂W = dYᵀ·X``
(out×in), which autograd would form and keep for every frozen matrix. Here it is computed from
the layer's input ``X`` (M×in) and output gradient ``dY`` (M×out) a block at a time::

    I = |(dYᵀ X) ⊙ W'|          (or its square)

and each block is reduced to its row sums (out,) and column sums (in,) and discarded: the work
of one weight-gradient GEMM, memory O(out + in) beyond one block. The reference below is
chunked over row blocks too, so that even it never holds an out×in temporary.
"""

from __future__ import annotations

import torch

from loraprune.ops._checks import FLOAT_DTYPES, check_scalar, check_tensor, check_weight
from loraprune.ops._dispatch import resolve
from loraprune.ops.quantized_weight import QuantizedWeight

# Rows of W' and of dYᵀX formed at a time by the reference.
REFERENCE_ROW_BLOCK = 256
IMPLEMENTATIONS = {
    "cuda": "loraprune.ops.cuda:taylor_importance",
    "triton": "loraprune.kernels.taylor_importance:taylor_importance",
    "torch": "loraprune.ops.taylor_importance:taylor_importance_reference",
}


def validate(
    x: torch.Tensor,
    grad_y: torch.Tensor,
    weight: torch.Tensor | QuantizedWeight,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scaling: float,
) -> None:
    out_features, in_features, device = check_weight("weight", weight)
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES, device=device)
    tokens = x.shape[0]
    check_tensor("x", x, shape=(tokens, in_features))
    check_tensor("grad_y", grad_y, shape=(tokens, out_features), dtypes=FLOAT_DTYPES, device=device)
    if (lora_a is None) != (lora_b is None):
        raise ValueError("lora_a and lora_b must both be given or both be None")
    if lora_a is not None:
        check_tensor("lora_a", lora_a, ndim=2, dtypes=FLOAT_DTYPES, device=device)
        rank = lora_a.shape[0]
        if rank < 1:
            raise ValueError(f"lora_a must have rank >= 1 rows, got shape {tuple(lora_a.shape)}")
        check_tensor("lora_a", lora_a, shape=(rank, in_features))
        check_tensor("lora_b", lora_b, shape=(out_features, rank), dtypes=FLOAT_DTYPES, device=device)
    check_scalar("scaling", scaling)


def taylor_importance_reference(
    x: torch.Tensor,
    grad_y: torch.Tensor,
    weight: torch.Tensor | QuantizedWeight,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scaling: float,
    squared: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The specification: fp32, one block of ``REFERENCE_ROW_BLOCK`` rows at a time (of a quantized
    ``W`` too, dequantized block by block)."""
    out_features, in_features = weight.shape
    x32, dy32 = x.float(), grad_y.float()
    rows = torch.empty(out_features, dtype=torch.float32, device=weight.device)
    cols = torch.zeros(in_features, dtype=torch.float32, device=weight.device)
    for start in range(0, out_features, REFERENCE_ROW_BLOCK):
        block = slice(start, min(start + REFERENCE_ROW_BLOCK, out_features))
        grad_block = dy32[:, block].T @ x32
        merged = (
            weight.dequantize_rows(block) if isinstance(weight, QuantizedWeight) else weight[block].float()
        )
        if lora_a is not None:
            merged = merged + scaling * (lora_b[block].float() @ lora_a.float())
        element = grad_block * merged
        element = element.square() if squared else element.abs()
        rows[block] = element.sum(dim=1)
        cols += element.sum(dim=0)
    return rows, cols


def taylor_importance(
    x: torch.Tensor,
    grad_y: torch.Tensor,
    weight: torch.Tensor | QuantizedWeight,
    lora_a: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    scaling: float = 0.0,
    *,
    squared: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row sums (out,) and column sums (in,) of ``|(dYᵀX) ⊙ (W + s·B·A)|``, in float32.

    Args:
        x: the layer's input, tokens flattened (M×in), as the forward saw it (after its input mask).
            With M = 0 the gradient is zero, and so are both sums.
        grad_y: the gradient of the loss with respect to the layer's output (M×out), unscaled.
        weight: frozen weight ``W`` (out×in), fp16/bf16/fp32, or a :class:`QuantizedWeight`
            (int8/nf4/fp4, dequantized as it is loaded).
        lora_a, lora_b: LoRA factors ``A`` (r×in) and ``B`` (out×r), or both ``None`` (``W' = W``).
        scaling: LoRA scaling ``s = alpha / r``.
        squared: use ``(∂L/∂W ⊙ W')²`` instead of ``|∂L/∂W ⊙ W'|``.
        backend: force ``"torch"``, ``"triton"`` or ``"cuda"`` (default: automatic, see ``loraprune.ops``).
    """
    validate(x, grad_y, weight, lora_a, lora_b, scaling)
    _, impl = resolve("taylor_importance", IMPLEMENTATIONS, weight.device, backend)
    return impl(x, grad_y, weight, lora_a, lora_b, float(scaling), squared)
