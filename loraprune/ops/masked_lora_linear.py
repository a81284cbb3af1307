"""The masked LoRA linear: ``Y = ((X⊙m_in) Wᵀ + b + s·drop(X⊙m_in) Aᵀ Bᵀ) ⊙ m_out``.

``m_out`` masks output features (rows of ``W``: q/k/v/gate/up), ``m_in`` input features
(columns: o/down). A masked structure contributes exactly zero through the base and the LoRA
path, and receives zero gradient. ``W`` and ``b`` are frozen; gradients flow to ``X``, ``A``
and ``B``. The reference's backward is autograd's; the Triton kernel fuses the base GEMM and
the LoRA up-projection into one accumulator and skips fully masked output tiles.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from loraprune.ops._checks import FLOAT_DTYPES, check_scalar, check_tensor
from loraprune.ops._dispatch import resolve

# The Triton kernels' fast paths, each selectable next to the path it replaces (README, "Kernels and
# backends"); LORAPRUNE_MLL_FAST_PATHS=default|all|none|a,b,... (a list may name "default").
FAST_PATHS = (
    "mask_cache",
    "k_tiles",
    "dropout_bits",
    "decode",
    "decode_split_k",
    "lora_k_steps",
    "persistent",
    "tma",
)
# On by default: the paths that remove work outright (a review without a GPU could justify them).
# decode_split_k, lora_k_steps, persistent and tma stay selectable, off by default, until a GPU run
# measures them faster than the path they replace on the README's shapes.
DEFAULT_FAST_PATHS = ("mask_cache", "k_tiles", "dropout_bits", "decode")
FAST_PATHS_ENV = "LORAPRUNE_MLL_FAST_PATHS"
# Widths of the K tiles whose kept lists a plan holds: every BLOCK_Q the kernels are tuned over.
K_TILE_WIDTHS = (16, 32, 64, 128, 256)


def enabled_fast_paths() -> frozenset[str]:
    """The fast paths ``LORAPRUNE_MLL_FAST_PATHS`` enables: unset or ``default``:
    :data:`DEFAULT_FAST_PATHS`; ``all``; ``none``; or a comma list of names (``default`` in it
    stands for the default set, e.g. ``default,tma``)."""
    value = os.environ.get(FAST_PATHS_ENV, "default").strip() or "default"
    if value == "all":
        return frozenset(FAST_PATHS)
    names = {n.strip() for n in value.split(",") if n.strip() and n.strip() != "none"}
    if "default" in names:
        names = (names - {"default"}) | set(DEFAULT_FAST_PATHS)
    unknown = names - set(FAST_PATHS)
    if unknown:
        raise ValueError(f"{FAST_PATHS_ENV}: unknown fast paths {sorted(unknown)}; choose from {FAST_PATHS}")
    return frozenset(names)


class MaskPlan(NamedTuple):
    """What the Triton kernels read of a layer's masks, computed on the device without a host
    synchronisation (per call, or cached by ``LoraPruneLinear`` and refreshed on the device):

    - ``out_mask``, ``in_mask``: the contiguous bool masks the kernels read, or ``None`` (all kept);
    - ``out_order`` (int64), ``out_count`` (0-d int64): the kept output features in ascending
      order, then the masked ones, and how many are kept; the kernels then gather the kept
      features (work scales with them). ``None`` with an ``out_mask``: the mask is applied in place
      (every feature computed, the masked ones zeroed), which is what a layer does with a mask it
      does not know to be masked;
    - ``in_tiles`` (int32): for each width of :data:`K_TILE_WIDTHS` in turn, the indices of the
      K tiles (input features ``[t·w, (t+1)·w)``) that hold a kept feature, ascending, then the
      others; ``in_tile_counts`` (int32): the kept-tile count per width (the kernels compute each
      list's offset from the widths). ``None`` when the input side is not masked or the plan was
      made without ``k_tiles`` (the K loops then visit every tile).
    """

    out_mask: torch.Tensor | None
    in_mask: torch.Tensor | None
    out_order: torch.Tensor | None
    out_count: torch.Tensor | None
    in_tiles: torch.Tensor | None
    in_tile_counts: torch.Tensor | None


def _kept_first(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept indices ascending then the others (a stable sort of one byte each), and the kept count."""
    return torch.argsort(keep.logical_not().view(torch.uint8), stable=True), keep.sum()


def masked_lora_linear_plan(
    out_mask: torch.Tensor | None, in_mask: torch.Tensor | None, k_tiles: bool = True, gather_out: bool = True
) -> MaskPlan:
    """The :class:`MaskPlan` of a pair of bool keep-masks (either may be ``None``); with
    ``gather_out=False`` the output mask is applied in place (no kept-first order)."""
    out_mask = None if out_mask is None else out_mask.contiguous()
    in_mask = None if in_mask is None else in_mask.contiguous()
    out_order = out_count = in_tiles = in_tile_counts = None
    if out_mask is not None and gather_out:
        out_order, out_count = _kept_first(out_mask)
    if in_mask is not None and k_tiles:
        orders, counts = [], []
        for width in K_TILE_WIDTHS:
            num_tiles = -(-in_mask.shape[0] // width)
            padded = F.pad(in_mask, (0, num_tiles * width - in_mask.shape[0]))
            order, count = _kept_first(padded.view(num_tiles, width).any(dim=1))
            orders.append(order)
            counts.append(count)
        in_tiles = torch.cat(orders).to(torch.int32)
        in_tile_counts = torch.stack(counts).to(torch.int32)
    return MaskPlan(out_mask, in_mask, out_order, out_count, in_tiles, in_tile_counts)


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
    plan: MaskPlan | Callable[[], MaskPlan] | None = None,
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
        plan: the :class:`MaskPlan` of these masks for the Triton kernels (made per call when not
            given), or a callable returning it, called only when the Triton kernels run
            (``LoraPruneLinear`` passes its cached plan so).
    """
    validate(x, weight, bias, lora_a, lora_b, scaling, out_mask, in_mask, dropout_p)
    trainable = [n for n, t in (("weight", weight), ("bias", bias)) if t is not None and t.requires_grad]
    unsupported = None
    if trainable and torch.is_grad_enabled():
        unsupported = {
            "triton": f"{' and '.join(trainable)} requires grad; its kernels compute no such gradient"
        }
    name, impl = resolve("masked_lora_linear", IMPLEMENTATIONS, x.device, backend, unsupported)
    args = (x, weight, bias, lora_a, lora_b, float(scaling), out_mask, in_mask, float(dropout_p), training)
    if name != "triton":
        return impl(*args)
    return impl(*args, plan=plan() if callable(plan) else plan)
