"""A frozen base held in 8 or 4 bits by bitsandbytes, with LoRA factors and masks as before.

The frozen projections are ``bitsandbytes.nn.Linear8bitLt`` (LLM.int8(): int8 with a scale per
row) or ``bitsandbytes.nn.Linear4bit`` (NF4: 4-bit codes with a scale per block of 64 elements);
the LoRA factors stay fp32 and the masks apply as in :class:`~loraprune.nn.LoraPruneLinear`.
The ``lora`` and fused ``taylor`` criteria hand the packed weight to their ops
(:class:`~loraprune.ops.QuantizedWeight`), whose kernels dequantize each tile as they load it
(the PyTorch references a block of rows at a time); the ``magnitude`` criterion dequantizes a
block of rows at a time (never the whole matrix), and compaction dequantizes the kept rows only,
merges in fp32 and writes the dense dtype.

Two ways in, the same modules out:

- ``LoraPruneConfig(quantize_base="int8"|"nf4")`` on a float model: each projection is
  quantized when it is patched (the float model must fit once, as the caller loaded it);
- a model loaded quantized (:func:`load_quantized_model`, the CLI's ``--quantize-base``, or a
  checkpoint with a bitsandbytes ``quantization_config``): transformers quantizes each weight
  as it is read, so the float model never exists; ``patch_model`` takes the layers over.

bitsandbytes is imported only when a quantized base is used (``pip install loraprune[quantization]``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from loraprune import ops
from loraprune.config import QUANTIZE_BASE
from loraprune.nn import LoraPruneLinear

# Elements of W dequantized at a time (fp32: 16 MiB), whatever the layer's width.
BLOCK_ELEMENTS = 1 << 22
# LLM.int8()'s outlier threshold, as transformers' BitsAndBytesConfig defaults it.
INT8_THRESHOLD = 6.0
NF4_BLOCKSIZE = 64


def bitsandbytes():
    """The bitsandbytes module, or one clear error saying how to install it."""
    try:
        import bitsandbytes
    except ImportError as exc:
        raise ImportError(
            f"quantize_base needs bitsandbytes (pip install 'loraprune[quantization]'): {exc}"
        ) from None
    matmul_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _Int8CastNotice) for f in matmul_logger.filters):
        matmul_logger.addFilter(_Int8CastNotice())
    return bitsandbytes


class _Int8CastNotice(logging.Filter):
    """Drops the warning LLM.int8() logs at every call with non-fp16 inputs: quantizing the
    activations through fp16 is how it always works, and a line per projection per step drowns the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def is_bitsandbytes_linear(module: nn.Module) -> bool:
    """A bitsandbytes ``Linear8bitLt``/``Linear4bit`` (checked without importing bitsandbytes)."""
    return type(module).__module__.startswith("bitsandbytes") and type(module).__name__ in (
        "Linear8bitLt",
        "Linear4bit",
    )


def quant_type(module: nn.Module) -> str:
    """``int8`` for a ``Linear8bitLt``, the 4-bit code (``nf4``, ``fp4``) for a ``Linear4bit``."""
    if type(module).__name__ == "Linear8bitLt":
        return "int8"
    return module.weight.quant_type


def check_quantize_base(value: str | None, name: str = "quantize_base") -> str | None:
    if value is not None and value not in QUANTIZE_BASE:
        raise ValueError(f"{name} must be one of {QUANTIZE_BASE} or None, got {value!r}")
    return value


def quantize_linear(weight: torch.Tensor, kind: str) -> nn.Module:
    """A bias-free bitsandbytes linear holding ``weight`` (out×in) quantized, on ``weight``'s device."""
    bnb = bitsandbytes()
    out_features, in_features = weight.shape
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(
            in_features, out_features, bias=False, has_fp16_weights=False, threshold=INT8_THRESHOLD
        )
        layer.weight = bnb.nn.Int8Params(weight.detach(), requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(
            in_features, out_features, bias=False, compute_dtype=weight.dtype, quant_type=kind
        )
        layer.weight = bnb.nn.Params4bit(
            weight.detach(),
            requires_grad=False,
            blocksize=NF4_BLOCKSIZE,
            compress_statistics=False,  # as transformers' BitsAndBytesConfig defaults it
            quant_type=kind,
        )
    return layer.to(weight.device)  # bitsandbytes quantizes on the move to a device


def bitsandbytes_config(kind: str, dtype: torch.dtype):
    """transformers' ``BitsAndBytesConfig`` giving the same layers as :func:`quantize_linear`."""
    from transformers import BitsAndBytesConfig

    check_quantize_base(kind, "quantize_base")
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=INT8_THRESHOLD)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_compute_dtype=dtype)


def load_quantized_model(
    model_dir: str | os.PathLike, kind: str, *, dtype: torch.dtype, device: torch.device
) -> nn.Module:
    """Load a float checkpoint with its projections quantized as they are read (lm_head stays in ``dtype``)."""
    from transformers import AutoModelForCausalLM

    bitsandbytes()
    return AutoModelForCausalLM.from_pretrained(
        model_dir,
        quantization_config=bitsandbytes_config(kind, dtype),
        device_map={"": device},
        dtype=dtype,
    )


def checkpoint_quant_type(model_dir: str | os.PathLike) -> str | None:
    """The bitsandbytes quantization a checkpoint was saved with (``None``: a float checkpoint)."""
    import json
    from pathlib import Path

    config = json.loads((Path(model_dir) / "config.json").read_text()).get("quantization_config")
    if not config:
        return None
    if config.get("quant_method") != "bitsandbytes":
        raise ValueError(
            f"MODEL_DIR: quantization {config.get('quant_method')!r} is not supported "
            "(only bitsandbytes int8/4-bit checkpoints can be pruned)"
        )
    return "int8" if config.get("load_in_8bit") else config.get("bnb_4bit_quant_type", "fp4")


class QuantizedLoraPruneLinear(LoraPruneLinear):
    """:class:`~loraprune.nn.LoraPruneLinear` whose frozen ``W`` lives in a bitsandbytes layer.

    There is no dense ``weight`` attribute (code that would read one fails loudly instead of
    reading codes as numbers): :meth:`dequantize_rows` gives rows of ``W`` in fp32. The forward
    is the masked LoRA reference with ``x Wᵀ`` computed by bitsandbytes.
    ``dense_dtype`` is the dtype compaction and :meth:`merged_linear` write.
    """

    def __init__(
        self,
        base: nn.Module,
        bias: torch.Tensor | None,
        r: int,
        alpha: float,
        dropout: float,
        dense_dtype: torch.dtype,
    ) -> None:
        if not is_bitsandbytes_linear(base) or base.bias is not None:
            raise TypeError(f"base must be a bias-free bitsandbytes linear, got {type(base).__name__}")
        device = base.weight.device
        # A zero-stride stand-in gives the parent the shape and device without a dense copy.
        stand_in = torch.zeros((), dtype=dense_dtype, device=device).expand(
            base.out_features, base.in_features
        )
        super().__init__(stand_in, bias, r, alpha, dropout)
        del self.weight
        if quant_type(base) != "int8":
            state = base.weight.quant_state
            if getattr(state, "packing_format_for_cpu", False):
                raise ValueError("base: its 4-bit codes were repacked for CPU inference and cannot be read")
            if device.type == "cpu" and base.in_features % state.blocksize:
                # Found here: bitsandbytes 0.50's CPU kernel then starts a block at every row, while
                # the codes run in blocks across rows, so its matmul computes with wrong scales.
                raise ValueError(
                    f"quantize_base {quant_type(base)!r} on the CPU needs in_features to be a multiple of "
                    f"the {state.blocksize}-element block, got {base.in_features}"
                )
            # bitsandbytes repacks 4-bit codes for CPU inference at the first no-grad forward (and
            # fails for widths not a multiple of 32): keep the layout the dequantization reads.
            base.support_avx512bf16_for_cpu = False
        self.base = base
        self.dense_dtype = dense_dtype
        self.quant_type = quant_type(base)

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        kind: str | None,
        r: int,
        alpha: float,
        dropout: float,
        dense_dtype: torch.dtype,
    ) -> QuantizedLoraPruneLinear:
        """Quantize an ``nn.Linear`` to ``kind``, or take over a bitsandbytes linear (of ``kind`` if given)."""
        if is_bitsandbytes_linear(module):
            found = quant_type(module)
            if kind is not None and found != kind:
                raise ValueError(f"quantize_base is {kind!r} but the model was loaded quantized as {found!r}")
            bias, module.bias = module.bias, None
            return cls(module, bias, r, alpha, dropout, dense_dtype)
        check_quantize_base(kind)
        return cls(quantize_linear(module.weight, kind), module.bias, r, alpha, dropout, module.weight.dtype)

    # -- W, a block of rows at a time ------------------------------------------------------------
    def row_blocks(self) -> Iterator[slice]:
        """Slices of rows holding about ``BLOCK_ELEMENTS`` elements each."""
        step = max(1, BLOCK_ELEMENTS // self.in_features)
        for start in range(0, self.out_features, step):
            yield slice(start, min(start + step, self.out_features))

    def packed_weight(self) -> ops.QuantizedWeight:
        """``W`` as the importance ops read it: bitsandbytes' codes and scales, in place."""
        return ops.QuantizedWeight.from_bitsandbytes(self.base)

    def dequantize_rows(self, rows: slice | torch.Tensor) -> torch.Tensor:
        """Rows of ``W`` (a slice, or int64 indices) in fp32; only those rows are read."""
        return self.packed_weight().dequantize_rows(rows)

    # -- what the criteria and compaction need ---------------------------------------------------
    def merged_rows(self, rows: slice | torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
        """``(W + s·B·A)[rows][:, cols]`` in fp32 (LoRA merged for the selected entries only)."""
        weight = self.dequantize_rows(rows)
        if cols is not None:
            weight = weight.index_select(1, cols)
        if self.lora_A is not None:
            lora_a = self.lora_A.float() if cols is None else self.lora_A.float().index_select(1, cols)
            weight = weight + self.scaling * (self.lora_B[rows].float() @ lora_a)
        return weight

    def lora_importance(self, squared: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`loraprune.ops.lora_importance` on the packed ``W``: rows (out,), columns (in,), fp32."""
        return ops.lora_importance(
            self.packed_weight(),
            self.lora_A,
            self.lora_B,
            self.lora_A.grad,
            self.lora_B.grad,
            self.scaling,
            squared=squared,
        )

    def taylor_importance(
        self, x: torch.Tensor, grad_y: torch.Tensor, squared: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`loraprune.ops.taylor_importance` on the packed ``W`` (``x``: M×in, ``grad_y``: M×out)."""
        return ops.taylor_importance(
            x, grad_y, self.packed_weight(), self.lora_A, self.lora_B, self.scaling, squared=squared
        )

    def magnitude_importance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Row and column sums of ``(W + s·B·A)²``, fp32."""
        rows = torch.empty(self.out_features, dtype=torch.float32, device=self.out_mask.device)
        cols = torch.zeros(self.in_features, dtype=torch.float32, device=self.out_mask.device)
        for block in self.row_blocks():
            element = self.merged_rows(block).square()
            rows[block] = element.sum(dim=1)
            cols += element.sum(dim=0)
        return rows, cols

    def compact(
        self, rows: torch.Tensor | None, cols: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W + s·B·A)[rows][:, cols]`` in ``dense_dtype`` and the kept bias, as ops.compact_linear
        returns them; only the kept rows are dequantized, a block at a time."""
        device = self.out_mask.device
        if rows is None:
            rows = torch.arange(self.out_features, device=device)
        step = max(1, BLOCK_ELEMENTS // self.in_features)
        weight = torch.cat(
            [
                self.merged_rows(rows[start : start + step], cols).to(self.dense_dtype)
                for start in range(0, rows.numel(), step)
            ]
        )
        bias = None if self.bias is None else self.bias.index_select(0, rows).clone()
        return weight.contiguous(), bias

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``W + s·B·A`` in fp32, dequantized a block of rows at a time."""
        return torch.cat([self.merged_rows(block) for block in self.row_blocks()])

    @torch.no_grad()
    def set_merged_weight(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Re-quantize ``weight`` into a new base of the same kind (``B`` becomes zero), so that the
        layer computes ``weight`` up to that quantization's rounding."""
        self._check_merged(weight, bias)
        base = quantize_linear(weight.to(self.dense_dtype), self.quant_type)
        if self.quant_type != "int8":
            base.support_avx512bf16_for_cpu = False  # the layout dequantize_rows reads (see __init__)
        self.base = base
        self._set_bias_and_clear_lora(bias)

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    # -- the layer ---------------------------------------------------------------------------------
    def _masked_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._in_masked:
            x = x * self.in_mask.to(x.dtype)
        # A fade (set_fade) scales the base's input columns and output rows, the LoRA path unchanged:
        # this forward is unfused, so the scaling is exact and costs one multiply per feature.
        y = self.base(x if self.fade_in is None else x * _fade_scale(self.fade_in, self.in_features, x))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        if self.fade_out is not None:
            y = y * _fade_scale(self.fade_out, self.out_features, y)
        if self.lora_A is not None:
            lora_in = F.dropout(x, self.dropout, training=True) if self.training and self.dropout > 0 else x
            y = y + self.scaling * F.linear(
                F.linear(lora_in, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype)
            )
        if self._out_masked:
            y = y * self.out_mask.to(y.dtype)
        return y

    def merged_linear(self) -> nn.Linear:
        """A dense ``nn.Linear`` in ``dense_dtype``: LoRA merged, masked rows/columns zeroed."""
        self._check_not_fading("merged_linear")
        weight, bias = self.compact(None, None)
        weight = weight * self.out_mask[:, None].to(weight.dtype) * self.in_mask[None, :].to(weight.dtype)
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias * self.out_mask.to(bias.dtype), requires_grad=False)
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, quant_type={self.quant_type}"


def _fade_scale(fade: tuple[torch.Tensor, torch.Tensor], size: int, like: torch.Tensor) -> torch.Tensor:
    """A per-feature scale: 1, and the fade's factor at its features."""
    index, factor = fade
    ones = torch.ones(size, dtype=like.dtype, device=like.device)
    return ones.index_copy(0, index, factor.to(like.dtype))


__all__ = [
    "QUANTIZE_BASE",
    "QuantizedLoraPruneLinear",
    "bitsandbytes_config",
    "checkpoint_quant_type",
    "is_bitsandbytes_linear",
    "load_quantized_model",
    "quantize_linear",
]
