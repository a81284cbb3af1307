"""A frozen weight held in 8 or 4 bits, as the importance ops read it: packed, dequantized on load.

``lora_importance`` and ``taylor_importance`` accept a :class:`QuantizedWeight` wherever they
take a dense ``W``. The PyTorch references dequantize it a block of rows at a time; the Triton
and CUDA kernels dequantize each tile as they load it, so the packed ``W`` is read once and no
dense copy exists. The layouts are bitsandbytes' (``Linear8bitLt``, ``Linear4bit``), read in
place by :meth:`QuantizedWeight.from_bitsandbytes`:

- ``int8`` (LLM.int8()): ``data`` int8 (out×in, unit column stride), ``scales`` float32 (out,)
  the absmax of each row (bitsandbytes' ``SCB``): ``W[i, j] = data[i, j] · scales[i] / 127``.
- ``nf4`` / ``fp4``: ``data`` uint8, the out·in elements of row-major ``W`` two to a byte
  (element ``e = i·in + j`` in byte ``e // 2``, the high nibble for even ``e``), ``scales``
  float32 (⌈out·in / blocksize⌉,) the absmax of each block of ``blocksize`` consecutive elements
  (blocks run across rows), ``code`` float32 (16,) the value of each nibble:
  ``W[e] = code[nibble(e)] · scales[e // blocksize]``. Double-quantized block scales are
  un-nested on the host (they are 1/blocksize of ``W``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# LLM.int8() dequantizes with the reciprocal of 127 (as bitsandbytes' int8_vectorwise_dequant).
INT8_INVERSE_SCALE = 7.874015718698502e-3
FOUR_BIT_KINDS = ("nf4", "fp4")
KINDS = ("int8", *FOUR_BIT_KINDS)


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """``W`` (``shape`` = out×in) packed as bitsandbytes holds it; see the module docstring."""

    kind: str
    data: torch.Tensor
    scales: torch.Tensor
    shape: tuple[int, int]
    code: torch.Tensor | None = None
    blocksize: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"weight.kind must be one of {KINDS}, got {self.kind!r}")
        out_features, in_features = self.shape
        if out_features < 0 or in_features < 0:
            raise ValueError(f"weight.shape must be non-negative, got {self.shape}")
        device = self.data.device
        if self.kind == "int8":
            if self.data.dtype != torch.int8 or tuple(self.data.shape) != tuple(self.shape):
                raise ValueError(
                    f"weight.data must be int8 of shape {tuple(self.shape)}, "
                    f"got {self.data.dtype} {tuple(self.data.shape)}"
                )
            if in_features > 1 and self.data.stride(1) != 1:
                raise ValueError("weight.data must have unit column stride")
            want_scales = out_features
        else:
            elements = out_features * in_features
            if (
                self.data.dtype != torch.uint8
                or self.data.ndim != 1
                or self.data.numel() < (elements + 1) // 2
            ):
                raise ValueError(
                    f"weight.data must be 1-D uint8 holding {elements} 4-bit codes, "
                    f"got {self.data.dtype} {tuple(self.data.shape)}"
                )
            if not self.data.is_contiguous():
                raise ValueError("weight.data must be contiguous")
            if self.blocksize < 2 or self.blocksize & (self.blocksize - 1):
                raise ValueError(f"weight.blocksize must be a power of two >= 2, got {self.blocksize}")
            code = self.code
            if (
                code is None
                or code.dtype != torch.float32
                or tuple(code.shape) != (16,)
                or code.device != device
            ):
                raise ValueError(f"weight.code must be float32 of shape (16,) on {device}")
            want_scales = -(-elements // self.blocksize)
        scales = self.scales
        if scales.dtype != torch.float32 or scales.ndim != 1 or scales.numel() < want_scales:
            raise ValueError(
                f"weight.scales must be 1-D float32 with {want_scales} entries, "
                f"got {scales.dtype} {tuple(scales.shape)}"
            )
        if not scales.is_contiguous() or scales.device != device:
            raise ValueError(f"weight.scales must be contiguous and on {device}")

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def four_bit(self) -> bool:
        return self.kind in FOUR_BIT_KINDS

    def dequantize_rows(self, rows: slice | torch.Tensor) -> torch.Tensor:
        """Rows of ``W`` (a slice, or int64 indices) in float32; only those rows are read."""
        out_features, in_features = self.shape
        if isinstance(rows, slice):
            start, stop, step = rows.indices(out_features)
            if step == 1:
                return self._dequantize_span(start, max(start, stop))
            rows = torch.arange(start, stop, step, device=self.device)
        if self.kind == "int8":
            return self.data[rows] * self.scales[rows].view(-1, 1) * INT8_INVERSE_SCALE
        elements = rows.to(torch.int64)[:, None] * in_features + torch.arange(in_features, device=self.device)
        packed = self.data[elements // 2].to(torch.int32)
        nibbles = torch.where(elements % 2 == 0, packed >> 4, packed & 15)
        return self.code[nibbles] * self.scales[elements // self.blocksize]

    def _dequantize_span(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop``: one contiguous run of elements, bytes and blocks."""
        in_features = self.shape[1]
        if self.kind == "int8":
            return self.data[start:stop] * self.scales[start:stop].view(-1, 1) * INT8_INVERSE_SCALE
        first, last = start * in_features, stop * in_features
        if first == last:
            return torch.empty((stop - start, in_features), dtype=torch.float32, device=self.device)
        # The values of each byte's two nibbles (high first): one lookup per byte.
        byte = torch.arange(256, device=self.device)
        byte_values = torch.stack([self.code[byte >> 4], self.code[byte & 15]], dim=1)
        first_byte = first // 2
        values = byte_values[self.data[first_byte : (last + 1) // 2].long()].view(-1)
        values = values[first - 2 * first_byte : last - 2 * first_byte]
        first_block = first // self.blocksize
        scales = self.scales[first_block : (last - 1) // self.blocksize + 1].repeat_interleave(self.blocksize)
        offset = first - first_block * self.blocksize
        return (values * scales[offset : offset + last - first]).view(stop - start, in_features)

    @classmethod
    def from_bitsandbytes(cls, module: torch.nn.Module) -> QuantizedWeight:
        """The weight of a bitsandbytes ``Linear8bitLt`` (int8, no fp16 copy) or ``Linear4bit``,
        read in place (only double-quantized block scales are computed)."""
        weight = module.weight
        shape = (module.out_features, module.in_features)
        if type(module).__name__ == "Linear8bitLt":
            # The row scales move from the parameter to the layer's state at its first forward.
            scales = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
            if scales is None or weight.dtype != torch.int8:
                raise ValueError("weight: the Linear8bitLt holds no int8 weight (has_fp16_weights=True?)")
            return cls("int8", weight.data, scales.float().contiguous(), shape)
        state = weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            raise ValueError("weight: its 4-bit codes were repacked for CPU inference and cannot be read")
        absmax = state.absmax
        if state.nested:  # double quantization: the block scales are themselves 8-bit
            import bitsandbytes.functional as bnb_functional

            absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
        return cls(
            state.quant_type,
            weight.data.view(torch.uint8).reshape(-1),  # any quant_storage dtype holds the same bytes
            absmax.float().contiguous(),
            shape,
            code=state.code.to(device=weight.device, dtype=torch.float32).contiguous(),
            blocksize=int(state.blocksize),
        )
