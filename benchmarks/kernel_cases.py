"""Study 1: the cases, providers and floors of the kernel micro-benchmarks.

The cases are the LLaMA-7B projection shapes (q/k/v/o share one shape, gate/up another, so
three distinct shapes), in float16 with LoRA factors and their gradients in float32 as the
model keeps them (``LoraPruneLinear`` and PEFT both hold adapters in float32).

- ``lora_importance``: row and column sums of the LoRA-guided importance of one weight. Providers:
  ``naive`` (the official LoRAPrune code: full-size estimated gradient and element importance),
  ``compiled`` (``torch.compile`` of it), ``triton`` and ``cuda`` (loraprune's kernels; ``cuda`` in
  the default factor staging, ``double``) and ``cuda_single`` (the CUDA kernel's single-buffered
  factor staging, ``loraprune.ops.cuda.lora_importance(..., staging="single")``).
- ``lora_importance_packed``: the same for one weight held packed as bitsandbytes holds it (int8,
  nf4; ``loraprune.ops.QuantizedWeight``, dequantized in the kernels' load stage) against the bf16
  dense weight. Providers ``<backend>-<base>`` (``triton-int8``, ``cuda-nf4``, ...), each against
  ``<backend>-bf16``; the packed bases need bitsandbytes (on the GPU: with its CUDA backend).
- ``lora_importance_layer``: the same for the seven linears of one LLaMA-7B layer, plus the
  peak temporary memory (``lora_importance_layer_memory``).
- ``masked_lora_linear_fwd`` / ``_fwd_bwd``: the masked LoRA linear, 0 % or 50 % of the output
  features masked, dropout off. Providers: ``dense`` (the base GEMM alone: speed of light; for
  fwd+bwd with the input gradient only), ``peft`` (PEFT's unfused ``X·Wᵀ + s·(X·Aᵀ)·Bᵀ``, mask
  multiplied after, as the official code does), ``compiled`` (``torch.compile`` of that),
  ``triton`` and ``cuda`` (when loraprune has such an implementation).
- ``taylor_importance``: row and column sums of LLM-Pruner's ``|∂L/∂W ⊙ (W + s·B·A)|`` from a
  projection's input X and output gradient dY over M tokens. Providers: ``materialised`` (what
  autograd and LLM-Pruner do: the out×in weight gradient ``dYᵀX`` in the activation dtype, then the
  product and the reductions), ``dense`` (the weight-gradient GEMM ``dYᵀX`` alone: speed of light),
  ``torch`` (loraprune's reference, chunked over row blocks), ``triton`` and ``cuda`` (the fused
  kernels: the GEMM with the reduction as its epilogue). On the GPU each provider also gets a
  ``taylor_importance_memory`` row: its peak temporary memory.

A provider whose backend cannot run is recorded as ``missing`` with the reason; an output that
disagrees with the float32 reference is recorded as ``wrong`` and not timed.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import itertools
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from benchmarks.harness import (
    MIB,
    Recorder,
    Result,
    iterations_for,
    l2_cache_bytes,
    peak_memory_bytes,
    time_calls,
)
from loraprune import ops
from loraprune.ops import backend_unavailable_reason
from loraprune.quantization import NF4_BLOCKSIZE

# the op modules (their implementation tables and references): loraprune.ops re-exports the op
# functions under the modules' names, so they are fetched by module path
lora_importance_module = importlib.import_module("loraprune.ops.lora_importance")
masked_lora_linear_module = importlib.import_module("loraprune.ops.masked_lora_linear")
taylor_importance_module = importlib.import_module("loraprune.ops.taylor_importance")

WEIGHT_DTYPE = torch.float16
LORA_DTYPE = torch.float32
DTYPE_LABEL = "float16 (LoRA float32)"
SCALING = 2.0
TOLERANCE = 1e-2  # relative L2 error against the float32 reference; fp16 products land near 1e-3

# LLaMA-7B projections: name -> (in_features, out_features)
LLAMA7B_LAYER = {
    "q_proj": (4096, 4096),
    "k_proj": (4096, 4096),
    "v_proj": (4096, 4096),
    "o_proj": (4096, 4096),
    "gate_proj": (4096, 11008),
    "up_proj": (4096, 11008),
    "down_proj": (11008, 4096),
}
LLAMA7B_SHAPES = {"qkvo": (4096, 4096), "gate_up": (4096, 11008), "down": (11008, 4096)}

IMPORTANCE_PROVIDERS = ("naive", "compiled", "triton", "cuda", "cuda_single")
# the weight bases of lora_importance_packed: the dense peer first (rows take ratios against it)
PACKED_BASES = ("bf16", "int8", "nf4")
PACKED_PROVIDERS = tuple(f"{backend}-{base}" for backend in ("triton", "cuda") for base in PACKED_BASES)
PACKED_DENSE_DTYPE = torch.bfloat16
PACKED_DTYPE_LABEL = "W bfloat16 or packed int8/nf4 (LoRA float32)"
LINEAR_PROVIDERS = ("peft", "dense", "compiled", "triton", "cuda")
TAYLOR_PROVIDERS = ("materialised", "dense", "torch", "triton", "cuda")
IMPORTANCE_REFERENCE = "naive"
LINEAR_REFERENCE = "peft"
TAYLOR_REFERENCE = "materialised"
GRAD_STD = 1e-3  # output gradients of a language-model loss are small; the kernels do not care


@dataclass(frozen=True)
class Grid:
    importance_ranks: tuple[int, ...]
    layer_ranks: tuple[int, ...]
    linear_ranks: tuple[int, ...]
    tokens: tuple[int, ...]
    masked_fractions: tuple[float, ...]
    rounds: int
    taylor_tokens: tuple[int, ...] = (2048,)


FULL = Grid(
    (8, 16, 64),
    (8,),
    (8, 16, 64),
    (1, 16, 2048, 8192),
    (0.0, 0.5),
    rounds=50,
    taylor_tokens=(512, 2048, 8192),
)
QUICK = Grid((8,), (8,), (16,), (2048,), (0.0, 0.5), rounds=20)


# --- cases ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportanceCase:
    """Importance of the given weights (one projection, or all seven of a layer)."""

    name: str
    linears: tuple[tuple[int, int], ...]  # (in_features, out_features) of each weight
    rank: int

    @property
    def benchmark(self) -> str:
        return "lora_importance_layer" if len(self.linears) > 1 else "lora_importance"

    @property
    def shape(self) -> str:
        if len(self.linears) > 1:
            return f"{self.name} ({len(self.linears)} linears) r={self.rank}"
        in_features, out_features = self.linears[0]
        return f"{self.name} {out_features}x{in_features} r={self.rank}"

    def __str__(self) -> str:
        return self.shape

    def bytes_and_flops(self) -> tuple[float, float]:
        """Each input read once (W, A, B, gA, gB), both sums written once; G·W' needs three rank-r products."""
        weight, factor = WEIGHT_DTYPE.itemsize, LORA_DTYPE.itemsize
        total_bytes = total_flops = 0.0
        for in_features, out_features in self.linears:
            total_bytes += out_features * in_features * weight
            total_bytes += 2 * self.rank * (in_features + out_features) * factor
            total_bytes += (in_features + out_features) * 4
            total_flops += 3 * 2 * self.rank * out_features * in_features
        return total_bytes, total_flops


@dataclass(frozen=True)
class PackedImportanceCase(ImportanceCase):
    """One weight's importance with ``W`` bf16 or packed; the provider names the base."""

    benchmark = "lora_importance_packed"

    def bytes_and_flops(self, base: str = "bf16") -> tuple[float, float]:
        """As :meth:`ImportanceCase.bytes_and_flops`, with ``W`` read as ``base`` stores it (int8: one
        byte an element and a float32 scale a row; nf4: half a byte and a float32 scale a block)."""
        (in_features, out_features), r = self.linears[0], self.rank
        if base == "int8":
            weight_bytes = out_features * in_features + 4 * out_features
        elif base == "nf4":
            weight_bytes = out_features * in_features / 2 + 4 * math.ceil(
                out_features * in_features / NF4_BLOCKSIZE
            )
        else:
            weight_bytes = out_features * in_features * PACKED_DENSE_DTYPE.itemsize
        factor_bytes = 2 * r * (in_features + out_features) * LORA_DTYPE.itemsize
        return weight_bytes + factor_bytes + (in_features + out_features) * 4, (
            3 * 2 * r * out_features * in_features
        )


@dataclass(frozen=True)
class LinearCase:
    """The masked LoRA linear on ``tokens`` rows, forward or forward + backward."""

    name: str
    in_features: int
    out_features: int
    rank: int
    tokens: int
    masked_fraction: float
    backward: bool

    @property
    def benchmark(self) -> str:
        return "masked_lora_linear_fwd_bwd" if self.backward else "masked_lora_linear_fwd"

    @property
    def shape(self) -> str:
        return (
            f"{self.name} M={self.tokens} {self.in_features}->{self.out_features} r={self.rank} "
            f"masked={round(100 * self.masked_fraction)}%"
        )

    def __str__(self) -> str:
        return f"{self.benchmark} {self.shape}"

    @property
    def kept_outputs(self) -> int:
        return self.out_features - round(self.masked_fraction * self.out_features)

    def bytes_and_flops(self) -> tuple[float, float]:
        """Kept output features only; every input read once and every output written once.

        Forward reads X, the kept rows of W, A, B and writes Y (masked columns too: they are
        zeros). Backward adds dY read and dX, dA, dB written, and its five products.
        """
        m, k, n, r = self.tokens, self.in_features, self.kept_outputs, self.rank
        act, factor = WEIGHT_DTYPE.itemsize, LORA_DTYPE.itemsize
        nbytes = (m * k + m * self.out_features + n * k) * act + (r * k + n * r) * factor
        flops = 2 * m * n * k + 2 * m * r * k + 2 * m * r * n
        if self.backward:
            nbytes += (m * self.out_features + m * k) * act + (r * k + n * r) * factor
            flops += 2 * m * n * k + 2 * (2 * m * n * r) + 2 * (2 * m * r * k)
        return nbytes, flops


@dataclass(frozen=True)
class TaylorCase:
    """Taylor importance of one projection from its input and output gradient over ``tokens`` rows."""

    name: str
    in_features: int
    out_features: int
    rank: int
    tokens: int

    benchmark = "taylor_importance"

    @property
    def shape(self) -> str:
        return f"{self.name} M={self.tokens} {self.out_features}x{self.in_features} r={self.rank}"

    def __str__(self) -> str:
        return f"{self.benchmark} {self.shape}"

    def bytes_and_flops(self) -> tuple[float, float]:
        """X, dY, W, A, B read once, both sums written once; the GEMM ``dYᵀX`` and ``B·A``."""
        m, k, n, r = self.tokens, self.in_features, self.out_features, self.rank
        act, factor = WEIGHT_DTYPE.itemsize, LORA_DTYPE.itemsize
        nbytes = (m * k + m * n + n * k) * act + r * (k + n) * factor + (k + n) * 4
        return nbytes, 2 * m * n * k + 2 * r * n * k


def taylor_cases(grid: Grid) -> list[TaylorCase]:
    return [
        TaylorCase(name, in_features, out_features, rank, tokens)
        for name, (in_features, out_features) in LLAMA7B_SHAPES.items()
        for rank in grid.importance_ranks
        for tokens in grid.taylor_tokens
    ]


def importance_cases(grid: Grid) -> list[ImportanceCase]:
    cases = [
        ImportanceCase(name, ((in_features, out_features),), rank)
        for rank in grid.importance_ranks
        for name, (in_features, out_features) in LLAMA7B_SHAPES.items()
    ]
    layer = tuple(LLAMA7B_LAYER.values())
    return cases + [ImportanceCase("llama-7b layer", layer, rank) for rank in grid.layer_ranks]


def packed_importance_cases(grid: Grid) -> list[PackedImportanceCase]:
    return [
        PackedImportanceCase(name, ((in_features, out_features),), rank)
        for rank in grid.importance_ranks
        for name, (in_features, out_features) in LLAMA7B_SHAPES.items()
    ]


def linear_cases(grid: Grid) -> list[LinearCase]:
    return [
        LinearCase(name, in_features, out_features, rank, tokens, fraction, backward)
        for backward in (False, True)
        for name, (in_features, out_features) in LLAMA7B_SHAPES.items()
        for rank in grid.linear_ranks
        for tokens in grid.tokens
        for fraction in grid.masked_fractions
    ]


# --- fast paths of the Triton masked LoRA linear: each against its old path and the dense GEMM ---

# triton-old: every fast path off; triton-path: only the case's path; triton: all of them (not the
# default set, which holds only mask_cache, k_tiles, dropout_bits and decode).
FAST_PATH_PROVIDERS = ("triton-old", "dense", "triton-path", "triton")
FAST_PATH_REFERENCE = "triton-old"
# The fast paths of the masked GEMM itself (forward and dX), timed at prefill sizes.
GEMM_FAST_PATHS = ("lora_k_steps", "persistent", "tma")
# (projection, tokens, fwd+bwd, masked fraction): the goal's M = 2048 and 8192 on 4096→11008, the
# backward, and the K-heavy 11008→4096; the masked rows for lora_k_steps only (the others do not
# change what a mask does).
GEMM_PATH_RUNS = (
    ("gate_up", 2048, False, 0.0),
    ("gate_up", 8192, False, 0.0),
    ("gate_up", 2048, True, 0.0),
    ("down", 2048, False, 0.0),
    ("down", 2048, True, 0.0),
    ("gate_up", 2048, False, 0.5),
    ("gate_up", 2048, True, 0.5),
)
HEAD_DIM = 128


@dataclass(frozen=True)
class FastPathCase(LinearCase):
    """A case that selects one fast path of ``loraprune.ops.masked_lora_linear.FAST_PATHS``:
    ``in_masked``: half the 128-wide input heads masked (o_proj with pruned heads); ``dropout``:
    LoRA dropout in training."""

    path: str = "decode"
    in_masked: bool = False
    dropout: float = 0.0

    @property
    def benchmark(self) -> str:
        return f"masked_lora_linear_{self.path}_{'fwd_bwd' if self.backward else 'fwd'}"

    @property
    def shape(self) -> str:
        extra = (" in-heads=50%" if self.in_masked else "") + (
            f" dropout={self.dropout:g}" if self.dropout else ""
        )
        return super().shape + extra


def fast_path_cases(grid: Grid) -> list[FastPathCase]:
    """Decode at the grid's token counts up to 16 (1 on the quick grid), gate/up and down, and the
    split-K decode on the K-heavy down and o_proj (whose column tiles under-fill the SMs); then at
    M = 2048: the input-masked forward of o_proj, dropout in training, and the cached mask plan
    (fwd+bwd, 50 % of outputs masked, also at 16 tokens); the GEMM paths (lora_k_steps,
    persistent, tma) as GEMM_PATH_RUNS lists."""
    decode_tokens = [tokens for tokens in grid.tokens if tokens <= 16] or [1]
    cases = [
        FastPathCase(name, *LLAMA7B_SHAPES[name], 8, tokens, fraction, False, path="decode")
        for name in ("gate_up", "down")
        for tokens in decode_tokens
        for fraction in grid.masked_fractions
    ] + [
        FastPathCase(name, *LLAMA7B_SHAPES[shape], 8, tokens, 0.0, False, path="decode_split_k")
        for name, shape in (("down", "down"), ("o_proj", "qkvo"))
        for tokens in decode_tokens
    ]
    qkvo, gate_up = LLAMA7B_SHAPES["qkvo"], LLAMA7B_SHAPES["gate_up"]
    return [
        *cases,
        FastPathCase("o_proj", *qkvo, 8, 2048, 0.0, False, path="k_tiles", in_masked=True),
        FastPathCase("gate_up", *gate_up, 8, 2048, 0.0, True, path="dropout_bits", dropout=0.05),
        FastPathCase("gate_up", *gate_up, 8, 16, 0.5, True, path="mask_cache"),
        FastPathCase("gate_up", *gate_up, 8, 2048, 0.5, True, path="mask_cache"),
        *(
            FastPathCase(name, *LLAMA7B_SHAPES[name], 8, tokens, fraction, backward, path=path)
            for path in GEMM_FAST_PATHS
            for name, tokens, backward, fraction in GEMM_PATH_RUNS
            if fraction == 0.0 or path == "lora_k_steps"
        ),
    ]


def fast_path_inputs(case: FastPathCase, device: torch.device, seed: int) -> LinearInputs:
    inputs = linear_inputs(case, device, seed)
    if case.in_masked:
        g = torch.Generator(device).manual_seed(seed + 1)
        heads = torch.ones(case.in_features // HEAD_DIM, dtype=torch.bool, device=device)
        heads[torch.randperm(heads.numel(), generator=g, device=device)[: heads.numel() // 2]] = False
        inputs.in_mask = heads.repeat_interleave(HEAD_DIM)
    inputs.plan = masked_lora_linear_module.masked_lora_linear_plan(inputs.out_mask, inputs.in_mask)
    return inputs


def _fast_paths(provider: str, case: FastPathCase) -> frozenset[str]:
    every = frozenset(masked_lora_linear_module.FAST_PATHS)
    return {"triton-old": frozenset(), "triton-path": frozenset({case.path}), "triton": every}[provider]


def fast_path_provider(provider: str, case: FastPathCase) -> Callable[[LinearInputs], object]:
    """One forward (or forward + backward) through the Triton kernels with the provider's fast paths."""
    if provider == "dense":
        return linear_provider("dense", case.backward)
    kernel = importlib.import_module("loraprune.kernels.masked_lora_linear")
    paths = _fast_paths(provider, case)

    def run(t: LinearInputs) -> object:
        plan = t.plan if "mask_cache" in paths else None  # otherwise built per call, as before
        y = kernel.masked_lora_linear(
            t.x, t.weight, None, t.lora_a, t.lora_b, SCALING, t.out_mask, t.in_mask, case.dropout,
            case.dropout > 0, plan=plan, fast_paths=paths,
        )  # fmt: skip
        return torch.autograd.grad(y, (t.x, t.lora_a, t.lora_b), t.grad_y) if case.backward else y

    return run


def fast_path_reference(t: LinearInputs, case: FastPathCase, provider: str) -> object:
    """float32 reference; with dropout, the keep-mask of the seed the kernels drew (the caller
    restores the generator state the provider ran from)."""
    if not case.dropout:
        return linear_reference(t, case.backward)
    kernel = importlib.import_module("loraprune.kernels.masked_lora_linear")
    seed = kernel.draw_dropout_seed(t.x.device)
    bits = "dropout_bits" in _fast_paths(provider, case)
    keep = kernel.dropout_keep_mask(seed, *t.x.shape, case.dropout, dropout_bits=bits)
    x, a, b = (v.detach().float().requires_grad_(case.backward) for v in (t.x, t.lora_a, t.lora_b))
    lora_in = x * keep.float() / (1.0 - case.dropout)
    y = F.linear(x, t.weight.float()) + SCALING * F.linear(F.linear(lora_in, a), b)
    return torch.autograd.grad(y, (x, a, b), t.grad_y.float()) if case.backward else y


# --- inputs --------------------------------------------------------------------------------------


def _randn(
    shape: tuple[int, ...], std: float, dtype: torch.dtype, device: torch.device, g: torch.Generator
) -> torch.Tensor:
    return torch.randn(shape, generator=g, device=device, dtype=torch.float32).mul_(std).to(dtype)


def importance_inputs(
    case: ImportanceCase, device: torch.device, seed: int
) -> list[tuple[torch.Tensor, ...]]:
    """Per weight: (W, A, B, gA, gB), random (never zeros: they hide unwritten outputs)."""
    g = torch.Generator(device).manual_seed(seed)
    inputs = []
    for in_features, out_features in case.linears:
        r = case.rank
        inputs.append(
            (
                _randn((out_features, in_features), 0.02, WEIGHT_DTYPE, device, g),
                _randn((r, in_features), 1 / math.sqrt(in_features), LORA_DTYPE, device, g),
                _randn((out_features, r), 0.01, LORA_DTYPE, device, g),
                _randn((r, in_features), 1e-3, LORA_DTYPE, device, g),
                _randn((out_features, r), 1e-3, LORA_DTYPE, device, g),
            )
        )
    return inputs


def packed_importance_inputs(
    case: PackedImportanceCase, device: torch.device, seed: int, base: str
) -> tuple[torch.Tensor | ops.QuantizedWeight, ...]:
    """(W, A, B, gA, gB) with ``W`` random bf16, or that weight quantized by bitsandbytes as
    ``LoraPruneConfig(quantize_base=base)`` holds it and read packed in place."""
    g = torch.Generator(device).manual_seed(seed)
    (in_features, out_features), r = case.linears[0], case.rank
    weight = _randn((out_features, in_features), 0.02, PACKED_DENSE_DTYPE, device, g)
    if base != "bf16":
        from loraprune.quantization import quantize_linear

        weight = ops.QuantizedWeight.from_bitsandbytes(quantize_linear(weight, base))
    return (
        weight,
        _randn((r, in_features), 1 / math.sqrt(in_features), LORA_DTYPE, device, g),
        _randn((out_features, r), 0.01, LORA_DTYPE, device, g),
        _randn((r, in_features), 1e-3, LORA_DTYPE, device, g),
        _randn((out_features, r), 1e-3, LORA_DTYPE, device, g),
    )


def taylor_inputs(case: TaylorCase, device: torch.device, seed: int) -> tuple[torch.Tensor, ...]:
    """(X, dY, W, A, B): activations and weight in WEIGHT_DTYPE, factors in LORA_DTYPE, random."""
    g = torch.Generator(device).manual_seed(seed)
    m, k, n, r = case.tokens, case.in_features, case.out_features, case.rank
    return (
        _randn((m, k), 1.0, WEIGHT_DTYPE, device, g),
        _randn((m, n), GRAD_STD, WEIGHT_DTYPE, device, g),
        _randn((n, k), 0.02, WEIGHT_DTYPE, device, g),
        _randn((r, k), 1 / math.sqrt(k), LORA_DTYPE, device, g),
        _randn((n, r), 0.01, LORA_DTYPE, device, g),
    )


@dataclass
class LinearInputs:
    x: torch.Tensor
    weight: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    out_mask: torch.Tensor | None
    grad_y: torch.Tensor | None
    in_mask: torch.Tensor | None = None
    plan: tuple | None = None  # fast-path cases: the masks' MaskPlan, built once as LoraPruneLinear caches it


def linear_inputs(case: LinearCase, device: torch.device, seed: int) -> LinearInputs:
    g = torch.Generator(device).manual_seed(seed)
    k, n, r = case.in_features, case.out_features, case.rank
    x = _randn((case.tokens, k), 1.0, WEIGHT_DTYPE, device, g).requires_grad_(case.backward)
    weight = _randn((n, k), 1 / math.sqrt(k), WEIGHT_DTYPE, device, g)
    lora_a = _randn((r, k), 1 / math.sqrt(k), LORA_DTYPE, device, g).requires_grad_(case.backward)
    lora_b = _randn((n, r), 1 / math.sqrt(r), LORA_DTYPE, device, g).requires_grad_(case.backward)
    out_mask = None
    if case.masked_fraction:
        out_mask = torch.ones(n, dtype=torch.bool, device=device)
        out_mask[torch.randperm(n, generator=g, device=device)[: n - case.kept_outputs]] = False
    grad_y = _randn((case.tokens, n), 1.0, WEIGHT_DTYPE, device, g) if case.backward else None
    return LinearInputs(x, weight, lora_a, lora_b, out_mask, grad_y)


def input_bytes(inputs: torch.Tensor | ops.QuantizedWeight | LinearInputs | Sequence) -> int:
    """Bytes of the tensors of one input set."""
    if isinstance(inputs, torch.Tensor):
        return inputs.numel() * inputs.element_size()
    if isinstance(inputs, ops.QuantizedWeight):
        inputs = (inputs.data, inputs.scales, inputs.code)
    if isinstance(inputs, LinearInputs):
        inputs = [getattr(inputs, f.name) for f in dataclasses.fields(inputs)]
    return sum(input_bytes(t) for t in inputs if t is not None)


# --- providers -----------------------------------------------------------------------------------


def naive_importance(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    grad_a: torch.Tensor,
    grad_b: torch.Tensor,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The official LoRAPrune code (``compute_sensitivity``): full-size G and element importance."""
    grad = grad_b @ lora_a + lora_b @ grad_a - grad_b @ grad_a
    element = (grad * (lora_b @ lora_a * scaling + weight)).abs()
    return element.sum(dim=1), element.sum(dim=0)


def materialised_taylor(
    x: torch.Tensor,
    grad_y: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM-Pruner's element criterion as autograd feeds it: the full weight gradient ``dYᵀX`` (out×in,
    activation dtype), then ``|∂L/∂W ⊙ W'|`` in float32 and its row and column sums."""
    grad = grad_y.t() @ x
    element = (grad.float() * (weight.float() + scaling * (lora_b @ lora_a))).abs()
    return element.sum(dim=1), element.sum(dim=0)


def peft_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    out_mask: torch.Tensor | None,
) -> torch.Tensor:
    """PEFT's LoRA ``Linear.forward``: base GEMM, LoRA path in the adapters' dtype, added, cast back;
    then the mask multiplied in as the official LoRAPrune code does."""
    result = F.linear(x, weight)
    result = (result + F.linear(F.linear(x.to(lora_a.dtype), lora_a), lora_b) * scaling).to(x.dtype)
    return result if out_mask is None else result * out_mask


def _op_unavailable_reason(module: object, backend: str, device: torch.device) -> str | None:
    """Why loraprune's ``backend`` implementation of an op cannot be timed here (``None``: it can).

    Checked against the op's own implementation table, because forcing a backend an op lacks
    falls back to another one, which must not be timed under the missing one's name.
    """
    op = module.__name__.rsplit(".", 1)[-1]
    path = module.IMPLEMENTATIONS.get(backend)
    if path is None:
        return f"loraprune has no {backend} implementation of {op}"
    reason = backend_unavailable_reason(backend, device)
    if reason:
        return reason
    module_name, _, function = path.partition(":")
    try:
        getattr(importlib.import_module(module_name), function)
    except Exception as exc:  # a kernel module that fails to import is as missing as an absent one
        return f"{path} cannot be loaded: {type(exc).__name__}: {exc}"
    return None


def provider_backend(provider: str) -> str | None:
    """The loraprune backend a provider runs (``triton-old``, ``triton-int8``: triton; ``cuda_single``,
    ``cuda-nf4``: cuda), ``None`` for the other providers."""
    backend = provider.partition("-")[0].partition("_")[0]
    return backend if backend in ("triton", "cuda") else None


def unavailable_reason(kind: str, provider: str, device: torch.device) -> str | None:
    """Why ``provider`` cannot run for cases of ``kind`` (``importance``, ``packed``, ``linear``,
    ``fast_path`` or ``taylor``) on ``device``."""
    module = {
        "importance": lora_importance_module,
        "packed": lora_importance_module,
        "linear": masked_lora_linear_module,
        "fast_path": masked_lora_linear_module,
        "taylor": taylor_importance_module,
    }[kind]
    backend = provider_backend(provider)
    reason = _op_unavailable_reason(module, backend, device) if backend else None
    if reason is None and kind == "packed" and not provider.endswith("-bf16"):
        try:
            importlib.import_module("bitsandbytes")
        except ImportError as exc:
            reason = f"a packed weight needs bitsandbytes: {exc}"
    if reason or backend:
        return reason
    if provider == "compiled" and device.type != "cuda":
        return "torch.compile is timed on the GPU only"
    return None


def compile_fn(fn: Callable) -> Callable:
    """``torch.compile`` with a clean slate: static shapes, one graph, no recompile-limit fallback."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False, fullgraph=True)


def importance_provider(
    provider: str,
) -> Callable[[tuple[torch.Tensor, ...]], tuple[torch.Tensor, torch.Tensor]]:
    """A callable computing (rows, cols) of one weight's (W, A, B, gA, gB)."""
    if provider == "naive":
        fn = naive_importance
    elif provider == "compiled":
        fn = compile_fn(naive_importance)
    elif provider in ("triton", "cuda"):
        fn = functools.partial(ops.lora_importance, backend=provider)
    elif provider == "cuda_single":
        fn = functools.partial(
            importlib.import_module("loraprune.ops.cuda").lora_importance, staging="single"
        )
    else:
        raise ValueError(f"unknown importance provider {provider!r}")
    return lambda tensors: fn(*tensors, SCALING)


def taylor_provider(provider: str) -> Callable[[tuple[torch.Tensor, ...]], object]:
    """A callable computing (rows, cols) of one projection's (X, dY, W, A, B); ``dense``: ``dYᵀX`` only."""
    if provider == "dense":
        return lambda t: t[1].t() @ t[0]
    if provider == "materialised":
        fn = materialised_taylor
    elif provider in ("torch", "triton", "cuda"):
        fn = functools.partial(ops.taylor_importance, backend=provider)
    else:
        raise ValueError(f"unknown taylor provider {provider!r}")
    return lambda tensors: fn(*tensors, SCALING)


def importance_reference(tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    return lora_importance_module.lora_importance_reference(*tensors, SCALING)


def linear_provider(provider: str, backward: bool) -> Callable[[LinearInputs], object]:
    """A callable running one forward (or forward + backward) of the masked LoRA linear."""
    if provider == "dense":
        if backward:
            return lambda t: torch.autograd.grad(F.linear(t.x, t.weight), (t.x,), t.grad_y)
        return lambda t: F.linear(t.x, t.weight)
    if provider == "peft":
        forward = peft_lora_linear
    elif provider == "compiled":
        forward = compile_fn(peft_lora_linear)
    elif provider in ("triton", "cuda"):

        def forward(x, weight, lora_a, lora_b, scaling, out_mask):
            return ops.masked_lora_linear(
                x, weight, None, lora_a, lora_b, scaling, out_mask, backend=provider
            )

    else:
        raise ValueError(f"unknown linear provider {provider!r}")

    def run(t: LinearInputs) -> object:
        y = forward(t.x, t.weight, t.lora_a, t.lora_b, SCALING, t.out_mask)
        return torch.autograd.grad(y, (t.x, t.lora_a, t.lora_b), t.grad_y) if backward else y

    return run


def linear_reference(t: LinearInputs, backward: bool) -> object:
    """float32 reference of the forward (and of the three gradients)."""
    x, a, b = (v.detach().float().requires_grad_(backward) for v in (t.x, t.lora_a, t.lora_b))
    y = masked_lora_linear_module.masked_lora_linear_reference(
        x, t.weight.float(), None, a, b, SCALING, t.out_mask, t.in_mask
    )
    return torch.autograd.grad(y, (x, a, b), t.grad_y.float()) if backward else y


def relative_error(result: object, reference: object) -> float:
    """Largest ‖result − reference‖ / ‖reference‖ over the tensors of two (nested) results."""
    if isinstance(result, torch.Tensor):
        reference = reference.double()
        return float(
            torch.linalg.vector_norm(result.double() - reference) / torch.linalg.vector_norm(reference)
        )
    return max(relative_error(r, e) for r, e in zip(result, reference, strict=True))


# --- one measurement -----------------------------------------------------------------------------


def rotation_count(set_bytes: int, device: torch.device) -> int:
    """Input sets to rotate through so that each call finds its inputs outside the L2 cache."""
    if device.type != "cuda":
        return 1
    wanted = max(2, math.ceil(3 * l2_cache_bytes(device) / max(set_bytes, 1)))
    free_bytes, _ = torch.cuda.mem_get_info(device)
    return max(1, min(wanted, 64, free_bytes // 4 // max(set_bytes, 1)))


def run_case(
    benchmark: object,
    recorder: Recorder,
    case: ImportanceCase | LinearCase | TaylorCase,
    provider: str,
    rounds: int,
) -> dict[str, str]:
    """Check, time (through pytest-benchmark's ``benchmark.pedantic``) and record one provider on one case.

    Returns the recorded row; its status says whether the provider was ``missing``, ``wrong``
    (not timed) or ``ok``. An exception is recorded as ``error`` and raised again.
    """
    device = recorder.device
    kind, reference = {
        ImportanceCase: ("importance", IMPORTANCE_REFERENCE),
        PackedImportanceCase: ("packed", f"{provider_backend(provider)}-{PACKED_BASES[0]}"),
        LinearCase: ("linear", LINEAR_REFERENCE),
        FastPathCase: ("fast_path", FAST_PATH_REFERENCE),
        TaylorCase: ("taylor", TAYLOR_REFERENCE),
    }[type(case)]
    base = {
        "benchmark": case.benchmark,
        "provider": provider,
        "shape": case.shape,
        "dtype": PACKED_DTYPE_LABEL if kind == "packed" else DTYPE_LABEL,
        "reference": reference,
    }
    reason = unavailable_reason(kind, provider, device)
    if reason:
        return recorder.record(Result(**base, status="missing", note=reason))
    try:
        return _measure(benchmark, recorder, case, provider, rounds, base)
    except Exception as exc:
        recorder.record(Result(**base, status="error", note=f"{type(exc).__name__}: {exc}"[:300]))
        raise


def _measure(
    benchmark: object,
    recorder: Recorder,
    case: ImportanceCase | LinearCase | TaylorCase,
    provider: str,
    rounds: int,
    base: dict[str, str],
) -> dict[str, str]:
    device = recorder.device
    if isinstance(case, TaylorCase):
        run = taylor_provider(provider)
        make_inputs = taylor_inputs

        def expected(tensors):
            return taylor_importance_module.taylor_importance_reference(*tensors, SCALING)

    elif isinstance(case, FastPathCase):
        run = fast_path_provider(provider, case)
        make_inputs = fast_path_inputs

        def expected(inputs):
            return fast_path_reference(inputs, case, provider)

    elif isinstance(case, PackedImportanceCase):
        backend, _, weight_base = provider.partition("-")
        fn = functools.partial(ops.lora_importance, backend=backend)
        make_inputs = functools.partial(packed_importance_inputs, base=weight_base)

        def run(tensors):
            return fn(*tensors, SCALING)

        def expected(tensors):
            return lora_importance_module.lora_importance_reference(*tensors, SCALING)

    elif isinstance(case, ImportanceCase):
        fn = importance_provider(provider)
        make_inputs, reference = importance_inputs, importance_reference

        def run(tensor_sets):
            return [fn(tensors) for tensors in tensor_sets]

        def expected(tensor_sets):
            return [reference(tensors) for tensors in tensor_sets]

    else:
        run = linear_provider(provider, case.backward)
        make_inputs = linear_inputs

        def expected(inputs):
            return linear_reference(inputs, case.backward)

    first = make_inputs(case, device, seed=0)
    sets = [first] + [
        make_inputs(case, device, seed=i) for i in range(1, rotation_count(input_bytes(first), device))
    ]
    note = f"{len(sets)} rotated input sets of {input_bytes(first) / MIB:.3g} MiB"
    if provider != "dense":  # the dense GEMM computes another function: it is the speed-of-light peer
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            result = run(first)  # also the warm-up that compiles and tunes
        error = relative_error(result, expected(first))  # a dropout reference draws the same seed again
        note += f"; rel. error {error:.1e}"
        if not error <= TOLERANCE:
            return recorder.record(Result(**base, status="wrong", note=note))
    rotation = itertools.cycle(sets)

    def call() -> object:
        return run(next(rotation))

    estimate = statistics.median(time_calls(call, device, repetitions=5, warmup=2))
    iterations = iterations_for(estimate)
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=2, iterations=iterations)
    if benchmark.stats is None:
        return recorder.record(Result(**base, status="skipped", note="pytest-benchmark is disabled"))
    if isinstance(case, PackedImportanceCase):  # the bytes of the base the provider reads
        nbytes, flops = case.bytes_and_flops(provider.partition("-")[2])
        floor, basis = recorder.floor(nbytes, flops, PACKED_DENSE_DTYPE)
    else:
        nbytes, flops = case.bytes_and_flops()
        floor, basis = recorder.floor(nbytes, flops, WEIGHT_DTYPE)
    row = recorder.record(
        Result(
            **base,
            value=benchmark.stats.stats.median * 1e3,
            unit="ms",
            floor=floor,
            floor_basis=basis,
            repetitions=rounds * iterations,
            note=note,
        )
    )
    if isinstance(case, TaylorCase) and device.type == "cuda":
        recorder.record(
            Result(
                **{**base, "benchmark": case.benchmark + "_memory"},
                value=peak_memory_bytes(lambda: run(first), device) / MIB,
                unit="MiB",
                floor=4 * (case.in_features + case.out_features) / MIB,
                floor_basis="outputs",
                repetitions=1,
                note="peak allocated beyond the inputs (torch.cuda.max_memory_allocated delta)",
            )
        )
    if isinstance(case, ImportanceCase) and len(case.linears) > 1 and device.type == "cuda":
        output_bytes = sum(4 * (i + o) for i, o in case.linears)
        recorder.record(
            Result(
                **{**base, "benchmark": case.benchmark + "_memory"},
                value=peak_memory_bytes(lambda: run(first), device) / MIB,
                unit="MiB",
                floor=output_bytes / MIB,
                floor_basis="outputs",
                repetitions=1,
                note="peak allocated beyond the inputs (torch.cuda.max_memory_allocated delta)",
            )
        )
    return row
