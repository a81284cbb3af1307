"""Argument validation shared by the ops: every error names the offending argument."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loraprune.ops.quantized_weight import QuantizedWeight

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tensor(
    name: str,
    tensor: object,
    *,
    ndim: int | None = None,
    shape: Sequence[int | None] | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Raise a ``TypeError``/``ValueError`` naming ``name`` unless ``tensor`` fits the description.

    ``shape`` entries that are ``None`` match any size.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if shape is not None:
        ndim = len(shape)
    if ndim is not None and tensor.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")
    if shape is not None and any(w is not None and w != s for w, s in zip(shape, tensor.shape, strict=True)):
        want = tuple("*" if w is None else w for w in shape)
        raise ValueError(f"{name} must have shape {want}, got {tuple(tensor.shape)}")
    if dtypes is not None and tensor.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(
            f"{name} must have dtype in ({allowed}), got {str(tensor.dtype).removeprefix('torch.')}"
        )
    if device is not None and tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, expected {device} (the device of the other inputs)")
    return tensor


def check_scalar(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    high_inclusive: bool = True,
) -> float:
    """Check a finite real number in ``[low, high]`` (or ``[low, high)``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and (value > high or (not high_inclusive and value == high)):
        bound = "<=" if high_inclusive else "<"
        raise ValueError(f"{name} must be {bound} {high}, got {value}")
    return value


def check_weight(name: str, weight: object) -> tuple[int, int, torch.device]:
    """(out, in, device) of a dense float ``weight`` (out×in) or a :class:`QuantizedWeight`."""
    if not isinstance(weight, QuantizedWeight):
        check_tensor(name, weight, ndim=2, dtypes=FLOAT_DTYPES)
    return weight.shape[0], weight.shape[1], weight.device
