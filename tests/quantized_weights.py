"""Random weights quantized by bitsandbytes, as the importance tests take them: the packed weight
the ops read and bitsandbytes' own dequantization of it (the reference)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from loraprune.ops import QuantizedWeight

QUANTIZED_KINDS = ("int8", "nf4", "fp4")


def bitsandbytes_weight(
    kind: str, out_features: int, in_features: int, *, seed: int, device="cpu", nested: bool = False
) -> tuple[QuantizedWeight, torch.Tensor]:
    """A fresh random ``W`` (out×in, LoRA-base magnitudes) held by a bitsandbytes layer of ``kind``
    (``nested``: double-quantized 4-bit block scales): its :class:`QuantizedWeight`, read in place,
    and bitsandbytes' dequantization of the whole matrix in float32."""
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnb_functional

    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(out_features, in_features, generator=generator) * 0.05).to(device)
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=False, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        layer = layer.to(device)  # quantizes
        dense = bnb_functional.int8_vectorwise_dequant(layer.weight.data, layer.weight.SCB)
    else:
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, quant_type=kind)
        layer.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, blocksize=64, compress_statistics=nested, quant_type=kind
        )
        layer = layer.to(device)
        dense = bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    return QuantizedWeight.from_bitsandbytes(layer), dense.float().reshape(out_features, in_features)


def moved(weight: QuantizedWeight, device) -> QuantizedWeight:
    """``weight`` with its tensors on ``device``."""
    code = None if weight.code is None else weight.code.to(device)
    return dataclasses.replace(
        weight, data=weight.data.to(device), scales=weight.scales.to(device), code=code
    )
