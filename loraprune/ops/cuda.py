"""The ``cuda`` backend: thin wrappers over the compiled extension :mod:`loraprune._C`.

Each wrapper receives arguments already validated by its op in :mod:`loraprune.ops` (shapes,
dtypes, devices), prepares what the kernels assume — CUDA tensors on one device, a weight with
unit column stride (a transposed view is copied), float32 contiguous LoRA factors, int64
contiguous indices, freshly allocated outputs — and launches on the current stream of the
inputs' device. Importing this module never needs the extension; calling a wrapper without it
raises :class:`~loraprune.ops.BackendUnavailableError` saying how to build it.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from types import ModuleType
from typing import NamedTuple

import torch

from loraprune.ops._dispatch import CUDA_BUILD_HINT, BackendUnavailableError
from loraprune.ops.quantized_weight import QuantizedWeight

# Element type codes and weight formats of csrc/loraprune_C.h.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
WEIGHT_DENSE, WEIGHT_INT8, WEIGHT_FOUR_BIT = 0, 1, 2

# lora_importance's factor staging, selectable until a GPU run compares them (README, csrc/README.md):
# "double" (cp.async into two alternating buffers, the default) or "single" (the first kernel's).
FACTOR_STAGING_ENV = "LORAPRUNE_CUDA_FACTOR_STAGING"
FACTOR_STAGINGS = ("double", "single")

INT32_MAX = 2**31 - 1


def extension() -> ModuleType:
    """The compiled extension, or :class:`BackendUnavailableError` explaining how to build it."""
    try:
        return importlib.import_module("loraprune._C")
    except Exception as exc:  # ImportError, or OSError from a build for another platform
        raise BackendUnavailableError(
            f"the CUDA extension loraprune._C is not available ({type(exc).__name__}: {exc}); {CUDA_BUILD_HINT}"
        ) from exc


def _common_cuda_device(op: str, tensors: dict[str, torch.Tensor | None]) -> torch.device:
    """The one CUDA device all given tensors live on."""
    device = None
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if tensor.device.type != "cuda":
            raise ValueError(
                f"{op} (cuda backend): {name} is on {tensor.device}; the CUDA kernels need CUDA tensors"
            )
        if device is None:
            device = tensor.device
        elif tensor.device != device:
            raise ValueError(
                f"{op} (cuda backend): {name} is on {tensor.device}, the other inputs on {device}"
            )
    if device is None:
        raise ValueError(f"{op} (cuda backend): no tensor given")
    return device


def _current_stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _check_size(op: str, name: str, size: int) -> None:
    if size > INT32_MAX:
        raise ValueError(f"{op} (cuda backend): {name} = {size} exceeds the kernels' limit of {INT32_MAX}")


def _unit_column_stride(weight: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``weight`` with unit column stride, and its row stride in elements.

    Row-strided views (a slice of a fused QKV weight) are used in place; anything else (a
    transposed view) is copied once, which keeps the kernels on a single layout.
    """
    out_features, in_features = weight.shape
    column_stride = weight.stride(1) if in_features > 1 else 1
    if column_stride != 1:
        weight = weight.contiguous()
    row_stride = weight.stride(0) if out_features > 1 else in_features
    return weight, row_stride


def _float32_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.float32).contiguous()


class _WeightArgs(NamedTuple):
    """The binding's weight arguments; ``tensors`` keeps what the pointers point into alive."""

    tensors: tuple[torch.Tensor, ...]
    pointer: int
    dtype: int
    row_stride: int
    format: int
    scales: int
    code: int
    blocksize: int


def _weight_args(weight: torch.Tensor | QuantizedWeight) -> _WeightArgs:
    """A dense ``W`` with unit column stride, or a quantized one as the kernels read it packed."""
    if not isinstance(weight, QuantizedWeight):
        weight, row_stride = _unit_column_stride(weight)
        return _WeightArgs(
            (weight,), weight.data_ptr(), DTYPE_CODES[weight.dtype], row_stride, WEIGHT_DENSE, 0, 0, 0
        )
    if weight.kind == "int8":
        data = weight.data  # unit column stride (QuantizedWeight checks it)
        row_stride = data.stride(0) if weight.shape[0] > 1 else weight.shape[1]
        return _WeightArgs(
            (data, weight.scales), data.data_ptr(), 0, row_stride, WEIGHT_INT8, weight.scales.data_ptr(), 0, 0
        )
    tensors = (weight.data, weight.scales, weight.code)
    pointers = (weight.data.data_ptr(), weight.scales.data_ptr(), weight.code.data_ptr())
    return _WeightArgs(
        tensors, pointers[0], 0, weight.shape[1], WEIGHT_FOUR_BIT, *pointers[1:], weight.blocksize
    )


def factor_staging() -> str:
    """The factor staging ``LORAPRUNE_CUDA_FACTOR_STAGING`` selects (default ``double``)."""
    value = os.environ.get(FACTOR_STAGING_ENV, "double").strip() or "double"
    if value not in FACTOR_STAGINGS:
        raise ValueError(f"{FACTOR_STAGING_ENV} must be one of {FACTOR_STAGINGS}, got {value!r}")
    return value


def _weight_tensor(weight: torch.Tensor | QuantizedWeight) -> torch.Tensor:
    return weight.data if isinstance(weight, QuantizedWeight) else weight


def lora_importance(
    weight: torch.Tensor | QuantizedWeight,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    grad_a: torch.Tensor,
    grad_b: torch.Tensor,
    scaling: float,
    squared: bool = False,
    *,
    staging: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row sums (out,) and column sums (in,) of ``|G ⊙ (W + s·B·A)|`` in float32, one fused pass over ``W``.

    The rank products run on TF32 tensor cores with fp32 accumulation (see csrc/lora_importance.cu);
    a quantized ``W`` is read packed and dequantized in the kernel. ``staging``: the factor
    staging, ``"double"`` or ``"single"`` (default: :func:`factor_staging`).
    """
    op = "lora_importance"
    ext = extension()
    staging = factor_staging() if staging is None else staging
    if staging not in FACTOR_STAGINGS:
        raise ValueError(f"staging must be one of {FACTOR_STAGINGS}, got {staging!r}")
    device = _common_cuda_device(
        op,
        {
            "weight": _weight_tensor(weight),
            "lora_a": lora_a,
            "lora_b": lora_b,
            "grad_a": grad_a,
            "grad_b": grad_b,
        },
    )
    out_features, in_features = weight.shape
    rank = lora_a.shape[0]
    for name, size in (("out_features", out_features), ("in_features", in_features), ("rank", rank)):
        _check_size(op, name, size)
    row_sums = torch.empty(out_features, dtype=torch.float32, device=device)
    col_sums = torch.empty(in_features, dtype=torch.float32, device=device)
    if out_features == 0 or in_features == 0:
        return row_sums.zero_(), col_sums.zero_()
    w = _weight_args(weight)
    a, b, ga, gb = (_float32_contiguous(t) for t in (lora_a, lora_b, grad_a, grad_b))
    workspace_floats = ext.lora_importance_workspace_floats(out_features, in_features)
    workspace = torch.empty(workspace_floats, dtype=torch.float32, device=device)
    ext.lora_importance(
        device=device.index,
        stream=_current_stream(device),
        weight=w.pointer,
        dtype=w.dtype,
        out_features=out_features,
        in_features=in_features,
        weight_row_stride=w.row_stride,
        lora_a=a.data_ptr(),
        lora_b=b.data_ptr(),
        grad_a=ga.data_ptr(),
        grad_b=gb.data_ptr(),
        rank=rank,
        scaling=float(scaling),
        squared=bool(squared),
        row_sums=row_sums.data_ptr(),
        col_sums=col_sums.data_ptr(),
        workspace=workspace.data_ptr(),
        workspace_floats=workspace_floats,
        weight_format=w.format,
        weight_scales=w.scales,
        weight_code=w.code,
        weight_blocksize=w.blocksize,
        double_buffer=staging == "double",
    )
    return row_sums, col_sums


def taylor_importance(
    x: torch.Tensor,
    grad_y: torch.Tensor,
    weight: torch.Tensor | QuantizedWeight,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scaling: float,
    squared: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row sums (out,) and column sums (in,) of ``|(dYᵀX) ⊙ (W + s·B·A)|`` in float32, one fused GEMM over the tokens.

    dYᵀX runs on tensor cores (fp16/bf16 products exact, float32 through 3xTF32; see
    csrc/taylor_importance.cu). X and dY of different dtypes are both cast to float32 first. A
    quantized ``W`` is read packed and dequantized in the kernel.
    """
    op = "taylor_importance"
    ext = extension()
    device = _common_cuda_device(
        op, {"x": x, "grad_y": grad_y, "weight": _weight_tensor(weight), "lora_a": lora_a, "lora_b": lora_b}
    )
    tokens, in_features = x.shape
    out_features = weight.shape[0]
    rank = 0 if lora_a is None else lora_a.shape[0]
    sizes = (("tokens", tokens), ("out_features", out_features), ("in_features", in_features), ("rank", rank))
    for name, size in sizes:
        _check_size(op, name, size)
    row_sums = torch.empty(out_features, dtype=torch.float32, device=device)
    col_sums = torch.empty(in_features, dtype=torch.float32, device=device)
    if tokens == 0 or out_features == 0 or in_features == 0:
        return row_sums.zero_(), col_sums.zero_()
    if x.dtype != grad_y.dtype:
        x, grad_y = x.float(), grad_y.float()
    x, x_row_stride = _unit_column_stride(x)
    grad_y, grad_row_stride = _unit_column_stride(grad_y)
    w = _weight_args(weight)
    a, b = (None, None) if rank == 0 else (_float32_contiguous(lora_a), _float32_contiguous(lora_b))
    workspace_floats = ext.taylor_importance_workspace_floats(out_features, in_features)
    workspace = torch.empty(workspace_floats, dtype=torch.float32, device=device)
    ext.taylor_importance(
        device=device.index,
        stream=_current_stream(device),
        x=x.data_ptr(),
        grad_y=grad_y.data_ptr(),
        dtype=DTYPE_CODES[x.dtype],
        tokens=tokens,
        out_features=out_features,
        in_features=in_features,
        x_row_stride=x_row_stride,
        grad_row_stride=grad_row_stride,
        weight=w.pointer,
        weight_dtype=w.dtype,
        weight_row_stride=w.row_stride,
        lora_a=0 if a is None else a.data_ptr(),
        lora_b=0 if b is None else b.data_ptr(),
        rank=rank,
        scaling=float(scaling),
        squared=bool(squared),
        row_sums=row_sums.data_ptr(),
        col_sums=col_sums.data_ptr(),
        workspace=workspace.data_ptr(),
        workspace_floats=workspace_floats,
        weight_format=w.format,
        weight_scales=w.scales,
        weight_code=w.code,
        weight_blocksize=w.blocksize,
    )
    return row_sums, col_sums


def score_update(
    scores: torch.Tensor,
    parts: Sequence[torch.Tensor],
    decay: float,
    num_updates: torch.Tensor,
    num_skipped: torch.Tensor,
) -> None:
    """Normalise, fold and average ``parts`` into ``scores`` in place, in one single-block kernel."""
    op = "score_update"
    ext = extension()
    parts = list(parts)
    tensors = {"scores": scores, "num_updates": num_updates, "num_skipped": num_skipped}
    tensors.update({f"parts[{i}]": part for i, part in enumerate(parts)})
    device = _common_cuda_device(op, tensors)
    if scores.dtype != torch.float32 or scores.ndim != 1 or not scores.is_contiguous():
        raise ValueError(f"{op} (cuda backend): scores must be a contiguous 1-D float32 tensor")
    for name, counter in (("num_updates", num_updates), ("num_skipped", num_skipped)):
        if counter.dtype != torch.int64 or counter.numel() != 1:
            raise ValueError(f"{op} (cuda backend): {name} must be a one-element int64 tensor")
    for i, part in enumerate(parts):
        if part.ndim != 1 or part.dtype not in DTYPE_CODES:
            raise ValueError(f"{op} (cuda backend): parts[{i}] must be a 1-D float tensor")
    ext.score_update(
        device=device.index,
        stream=_current_stream(device),
        scores=scores.data_ptr(),
        num_units=scores.shape[0],
        parts=[part.data_ptr() for part in parts],
        part_lengths=[part.shape[0] for part in parts],
        part_strides=[part.stride(0) for part in parts],
        part_dtypes=[DTYPE_CODES[part.dtype] for part in parts],
        decay=float(decay),
        num_updates=num_updates.data_ptr(),
        num_skipped=num_skipped.data_ptr(),
    )


def compact_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scaling: float,
    rows: torch.Tensor | None = None,
    cols: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W + s·B·A)[rows][:, cols]`` in ``W``'s dtype (fp32 accumulation), and ``bias[rows]``.

    Index values are not checked here (``loraprune.ops.compact_linear`` does it): an index out of
    range is an out-of-bounds read on the device.
    """
    op = "compact_linear"
    ext = extension()
    device = _common_cuda_device(
        op, {"weight": weight, "bias": bias, "lora_a": lora_a, "lora_b": lora_b, "rows": rows, "cols": cols}
    )
    if (lora_a is None) != (lora_b is None):
        raise ValueError(f"{op} (cuda backend): lora_a and lora_b must be given together")
    out_features, in_features = weight.shape
    for name, index in (("rows", rows), ("cols", cols)):
        if index is not None and (index.dtype != torch.int64 or index.ndim != 1):
            raise ValueError(f"{op} (cuda backend): {name} must be a 1-D int64 tensor")
    rows = None if rows is None else rows.contiguous()
    cols = None if cols is None else cols.contiguous()
    num_rows = out_features if rows is None else rows.shape[0]
    num_cols = in_features if cols is None else cols.shape[0]
    compacted = torch.empty((num_rows, num_cols), dtype=weight.dtype, device=device)
    new_bias = None if bias is None else (bias if rows is None else bias.index_select(0, rows)).clone()
    if compacted.numel() == 0:
        return compacted, new_bias
    weight, row_stride = _unit_column_stride(weight)
    if lora_a is None:
        rank, a_ptr, b_ptr = 0, 0, 0
    else:
        rank = lora_a.shape[0]
        _check_size(op, "rank", rank)
        a, b = _float32_contiguous(lora_a), _float32_contiguous(lora_b)
        a_ptr, b_ptr = a.data_ptr(), b.data_ptr()
    ext.compact_linear(
        device=device.index,
        stream=_current_stream(device),
        weight=weight.data_ptr(),
        dtype=DTYPE_CODES[weight.dtype],
        out_features=out_features,
        in_features=in_features,
        weight_row_stride=row_stride,
        lora_a=a_ptr,
        lora_b=b_ptr,
        rank=rank,
        scaling=float(scaling),
        rows=0 if rows is None else rows.data_ptr(),
        num_rows=num_rows,
        cols=0 if cols is None else cols.data_ptr(),
        num_cols=num_cols,
        out=compacted.data_ptr(),
    )
    return compacted, new_bias
