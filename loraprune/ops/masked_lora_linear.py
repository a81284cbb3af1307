"""The masked LoRA linear: ``Y = ((X⊙m_in) Wᵀ + b + s·drop(X⊙m_in) Aᵀ Bᵀ) ⊙ m_out``.

``m_out`` masks output features (rows of ``W``: q/k/v/gate/up), ``m_in`` input features
(columns: o/down). A masked structure contributes exactly zero through the base and the LoRA
path, and receives zero gradient. ``W`` and ``b`` are frozen; gradients flow to ``X``, ``A``
and ``B``. The reference's backward is autograd's; the Triton kernel fuses the base GEMM and
the LoRA up-projection into one accumulator and skips fully masked output tiles.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loraprune.ops._checks import FLOAT_DTYPES, check_scalar, check_tensor
from loraprune.ops._dispatch import resolve

IMPLEMENTATIONS = {
    "triton": "loraprune.kernels.masked_lora_linear:masked_lora_linear",
    "torch": "loraprune.ops.masked_lora_linear:masked_lora_linear_reference",
}


def validate(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    out_mask: torch.Tensor | None,
    in_mask: torch.Tensor | None,
    dropout_p: float,
) -> None:
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES)
    out_features, in_features = weight.shape
    device = weight.device
    check_tensor("x", x, dtypes=FLOAT_DTYPES, device=device)
    if x.ndim < 1 or x.shape[-1] != in_features:
        raise ValueError(
            f"x must have last dimension {in_features} (weight.shape[1]), got shape {tuple(x.shape)}"
        )
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(device.type):
        raise TypeError(
            f"x has dtype {x.dtype} but weight has {weight.dtype}; cast x or run under torch.autocast"
        )
    if bias is not None:
        check_tensor("bias", bias, shape=(out_features,), dtypes=FLOAT_DTYPES, device=device)
    check_tensor("lora_a", lora_a, ndim=2, dtypes=FLOAT_DTYPES, device=device)
    rank = lora_a.shape[0]
    check_tensor("lora_a", lora_a, shape=(rank, in_features))
    check_tensor("lora_b", lora_b, shape=(out_features, rank), dtypes=FLOAT_DTYPES, device=device)
    if rank < 1:
        raise ValueError(f"lora_a must have at least one row (rank >= 1), got shape {tuple(lora_a.shape)}")
    check_scalar("scaling", scaling)
    if out_mask is not None:
        check_tensor("out_mask", out_mask, shape=(out_features,), dtypes=(torch.bool,), device=device)
    if in_mask is not None:
        check_tensor("in_mask", in_mask, shape=(in_features,), dtypes=(torch.bool,), device=device)
    check_scalar("dropout_p", dropout_p, low=0.0, high=1.0, high_inclusive=False)


def masked_lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    out_mask: torch.Tensor | None = None,
    in_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    if in_mask is not None:
        x = x * in_mask.to(x.dtype)
    y = F.linear(x, weight, bias)
    lora_in = F.dropout(x, dropout_p, training=True) if training and dropout_p > 0 else x
    y = y + scaling * F.linear(F.linear(lora_in, lora_a.to(x.dtype)), lora_b.to(x.dtype))
    if out_mask is not None:
        y = y * out_mask.to(y.dtype)
    return y


def masked_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    out_mask: torch.Tensor | None = None,
    in_mask: torch.Tensor | None = None,
    *,
    dropout_p: float = 0.0,
    training: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Forward of the masked LoRA linear (differentiable in ``x``, ``lora_a``, ``lora_b``).

    Args:
        x: input (..., in).
        weight, bias: frozen base layer, ``W`` (out×in) and ``b`` (out,) or ``None``.
        lora_a, lora_b: LoRA factors ``A`` (r×in), ``B`` (out×r).
        scaling: ``s = alpha / r``.
        out_mask, in_mask: bool keep-masks over output / input features, or ``None`` (keep all).
        dropout_p, training: dropout on the LoRA input, active only when ``training``.
        backend: force a backend (default: automatic, see ``loraprune.ops``).
    """
    validate(x, weight, bias, lora_a, lora_b, scaling, out_mask, in_mask, dropout_p)
    trainable = [n for n, t in (("weight", weight), ("bias", bias)) if t is not None and t.requires_grad]
    unsupported = None
    if trainable and torch.is_grad_enabled():
        unsupported = {
            "triton": f"{' and '.join(trainable)} requires grad; its kernels compute no such gradient"
        }
    _, impl = resolve("masked_lora_linear", IMPLEMENTATIONS, x.device, backend, unsupported)
    return impl(
        x, weight, bias, lora_a, lora_b, float(scaling), out_mask, in_mask, float(dropout_p), training
    )
