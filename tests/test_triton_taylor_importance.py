"""The Triton Taylor importance kernel (``kernels/taylor_importance.py``) against its PyTorch reference.

Without a GPU the kernel runs through the Triton interpreter at small odd shapes. The interpreter's
``tl.dot`` cannot take bfloat16 operands (it returns garbage), so bfloat16 activations and the
LLaMA-7B shapes run on a GPU only; bfloat16 weights and factors (loaded, not multiplied by
``tl.dot``) are checked here.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TRITON_SKIP_REASON, requires_cuda
from quantized_weights import QUANTIZED_KINDS, bitsandbytes_weight

from loraprune import ops
from loraprune.ops.taylor_importance import taylor_importance_reference

if TRITON_SKIP_REASON:
    pytest.skip(TRITON_SKIP_REASON, allow_module_level=True)
import triton  # after the skip: a run without triton skips this module

from loraprune.kernels import taylor_importance as kernel

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Max error allowed, relative to the largest expected magnitude. 16-bit operands multiply exactly
# into the fp32 accumulator, so every dtype differs from the reference by fp32 summation order only;
# float32 operands go through 3xTF32 on a GPU (close to fp32).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype == torch.float32
    assert torch.isfinite(actual).all()
    scale = max(expected.abs().max().item(), 1e-30)
    error = (actual - expected).abs().max().item()
    assert error <= tolerance * scale, f"max error {error:.3g} vs scale {scale:.3g}"


def make_inputs(
    tokens: int,
    out_features: int,
    in_features: int,
    rank: int,
    *,
    dtype: torch.dtype = torch.float32,
    grad_dtype: torch.dtype | None = None,
    weight_dtype: torch.dtype | None = None,
    factor_dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple:
    """(X, dY, W, A, B): random, never zero; A and B are None for rank 0."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, dtype, scale=1.0):
        return (torch.randn(shape, generator=g) * scale).to(device=DEVICE, dtype=dtype)

    x = randn(tokens, in_features, dtype=dtype)
    grad_y = randn(tokens, out_features, dtype=grad_dtype or dtype)
    weight = randn(out_features, in_features, dtype=weight_dtype or dtype, scale=0.05)
    if rank == 0:
        return x, grad_y, weight, None, None
    return (
        x,
        grad_y,
        weight,
        randn(rank, in_features, dtype=factor_dtype),
        randn(out_features, rank, dtype=factor_dtype, scale=0.1),
    )


def check(inputs: tuple, scaling: float, squared: bool, tolerance: float, backend: str | None = None) -> None:
    if backend is None:
        actual = kernel.taylor_importance(*inputs, scaling, squared)
    else:
        actual = ops.taylor_importance(*inputs, scaling, squared=squared, backend=backend)
    expected = taylor_importance_reference(*inputs, scaling, squared)
    for got, want in zip(actual, expected, strict=True):
        assert_close(got, want, tolerance)


def single_config(monkeypatch, block_n: int, block_k: int, block_m: int = 16) -> None:
    """Make the autotuner run one tile config (it does not benchmark a single config)."""
    config = triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k, "BLOCK_M": block_m, "GROUP_N": 2})
    monkeypatch.setattr(kernel._taylor_importance_kernel, "configs", [config])


SHAPES = {  # (tokens, out, in, rank): tails in every tile direction
    "odd": (37, 100, 136, 7),
    "one_token": (1, 70, 65, 3),
    "tiny": (2, 3, 5, 1),
    "no_lora": (45, 129, 66, 0),
    "rank100": (20, 40, 33, 100),
}


@pytest.mark.parametrize("squared", [False, True], ids=["abs", "squared"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_reference(shape, squared):
    check(make_inputs(*shape, seed=sum(shape)), 0.8, squared, TOLERANCE[torch.float32])


@pytest.mark.parametrize("tiles", [(128, 64), (64, 128), (128, 128)], ids=str)
def test_tiles_wider_than_the_partial_slots(monkeypatch, tiles):
    """Tiles covering several PARTIAL_BLOCK slots write their sum to one and zeros to the others;
    the partial buffers come back NaN-poisoned, so an unwritten slot would show."""
    single_config(monkeypatch, *tiles)
    inputs = make_inputs(33, 200, 130, 5, seed=1)
    expected = taylor_importance_reference(*inputs, 1.5, True)
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: empty(*args, **kwargs).fill_(float("nan")))
    actual = kernel.taylor_importance(*inputs, 1.5, True)
    monkeypatch.setattr(torch, "empty", empty)
    for got, want in zip(actual, expected, strict=True):
        assert_close(got, want, TOLERANCE[torch.float32])


@pytest.mark.parametrize(
    "dtype",
    [torch.float16, pytest.param(torch.bfloat16, marks=requires_cuda)],
    ids=["float16", "bfloat16"],
)
@pytest.mark.parametrize("factor_dtype", ["float32", "same"])
def test_half_precision(dtype, factor_dtype):
    inputs = make_inputs(
        29, 72, 90, 6, dtype=dtype, factor_dtype=torch.float32 if factor_dtype == "float32" else dtype, seed=2
    )
    for squared in (False, True):
        check(inputs, 2.0, squared, TOLERANCE[dtype])


@pytest.mark.parametrize(
    "dtypes",
    [(torch.float16, torch.float32, torch.bfloat16), (torch.float32, torch.bfloat16, torch.float16)],
    ids=["x16_dy32_wbf16", "x32_dybf16_w16"],
)
def test_mixed_dtypes_upcast_to_float32(dtypes):
    """X and dY of different dtypes are multiplied in float32, as the reference does."""
    x_dtype, grad_dtype, weight_dtype = dtypes
    inputs = make_inputs(
        21, 40, 50, 4, dtype=x_dtype, grad_dtype=grad_dtype, weight_dtype=weight_dtype, seed=3
    )
    check(inputs, 1.0, False, TOLERANCE[torch.float32])


def test_strided_inputs_through_ops():
    x, grad_y, weight, a, b = make_inputs(26, 52, 90, 6, seed=4)
    wide = torch.randn(26, 100, device=DEVICE)
    wide[:, 5:95] = x
    strided = (
        wide[:, 5:95],  # row stride 100, offset base
        grad_y.t().contiguous().t(),  # column-major
        weight.t().contiguous().t(),
        a.t().contiguous().t(),
        b.t().contiguous().t(),
    )
    assert not any(t.is_contiguous() for t in strided)
    check(strided, 2.0, False, TOLERANCE[torch.float32], backend="triton")


def test_zero_tokens_give_zero_sums():
    """No tokens: the gradient is zero, so is every sum (like the reference); nothing is launched."""
    inputs = make_inputs(0, 12, 20, 2)
    rows, cols = ops.taylor_importance(*inputs, 1.0, backend="triton")
    assert torch.equal(rows, torch.zeros(12, device=DEVICE))
    assert torch.equal(cols, torch.zeros(20, device=DEVICE))
    check(inputs, 1.0, False, TOLERANCE[torch.float32])


def test_deterministic():
    inputs = make_inputs(50, 130, 70, 8, seed=5)
    first = kernel.taylor_importance(*inputs, 0.5, False)
    second = kernel.taylor_importance(*inputs, 0.5, False)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_autotuning_candidates_fit_shared_memory_and_alignment():
    """Pruning before tuning: pipelined tiles within PIPELINE_SHARED_BYTES for the operand dtype,
    and FALLBACK_CONFIG alone for rows of X, dY or W not 16-element aligned and for X and dY of
    different dtypes (the others spill there)."""
    configs = [
        kernel._config(128, 128, 64, num_warps=8, num_stages=3),
        kernel._config(128, 64, 64, num_warps=4, num_stages=4),
        kernel._config(64, 64, 64, num_warps=4, num_stages=4),
    ]

    def candidates(in_features: int, dtype: torch.dtype, upcast: bool = False, offset: int = 0) -> list:
        x = torch.empty(8, in_features + offset, dtype=dtype)[:, offset:]
        grad_y, weight = torch.empty(8, 64, dtype=dtype), torch.empty(64, in_features, dtype=dtype)
        named = {"x_ptr": x, "rows_aligned": kernel._rows_aligned(x, grad_y, weight)}
        kept = kernel._prune_configs(configs, named, UPCAST=upcast)
        return [(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs["BLOCK_M"]) for c in kept]

    assert candidates(256, torch.bfloat16) == [(128, 128, 64), (128, 64, 64), (64, 64, 64)]
    assert candidates(136, torch.bfloat16) == [(64, 64, 32)]  # 136 = 8·17: unaligned rows
    assert candidates(256, torch.bfloat16, offset=8) == [(64, 64, 32)]  # misaligned base
    assert candidates(136, torch.float32) == [(64, 64, 32)]
    assert candidates(256, torch.float32) == [(64, 64, 64)]  # 4-byte operands: 128 KiB for 64x64
    assert candidates(256, torch.bfloat16, upcast=True) == [(64, 64, 32)]


@requires_cuda
@pytest.mark.parametrize(
    ("in_features", "out_features", "rank"),
    [(4096, 11008, 0), (11008, 4096, 8), (4096, 11008, 64)],
    ids=["up_no_lora", "down_r8", "up_r64"],
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_llama_shapes_half_precision(dtype, in_features, out_features, rank):
    inputs = make_inputs(2048, out_features, in_features, rank, dtype=dtype, seed=rank)
    for squared in (False, True):
        check(inputs, 2.0, squared, 1e-4)


@requires_cuda
def test_agrees_with_the_cuda_kernel():
    from loraprune.ops import cuda as cuda_ops

    try:
        cuda_ops.extension()
    except ops.BackendUnavailableError as exc:
        pytest.skip(str(exc))
    inputs = make_inputs(512, 4096, 1024, 8, dtype=torch.bfloat16, seed=6)
    for squared in (False, True):
        triton_sums = kernel.taylor_importance(*inputs, 2.0, squared)
        cuda_sums = ops.taylor_importance(*inputs, 2.0, squared=squared, backend="cuda")
        for got, want in zip(cuda_sums, triton_sums, strict=True):
            assert_close(got, want, 1e-4)


# --- a quantized W (dequantized as the kernel loads its tile) ---------------------------------------


@pytest.mark.parametrize(("shape", "rank"), [((37, 100), 5), ((64, 128), 0)], ids=["odd", "aligned_no_lora"])
@pytest.mark.parametrize("squared", [False, True], ids=["abs", "squared"])
@pytest.mark.parametrize("kind", QUANTIZED_KINDS)
def test_taylor_importance_of_a_quantized_weight(kind, squared, shape, rank):
    """Against the reference on the packed weight and on bitsandbytes' own dequantization of it;
    odd widths put 4-bit rows mid-byte and blocks across rows."""
    out_features, in_features = shape
    x, grad_y, _, a, b = make_inputs(9, out_features, in_features, rank, seed=rank + 1)
    weight, dequantized = bitsandbytes_weight(kind, out_features, in_features, seed=rank, device=DEVICE)
    actual = ops.taylor_importance(x, grad_y, weight, a, b, 1.5, squared=squared, backend="triton")
    for reference_weight in (weight, dequantized):
        expected = taylor_importance_reference(x, grad_y, reference_weight, a, b, 1.5, squared)
        for got, want in zip(actual, expected, strict=True):
            assert_close(got, want, TOLERANCE[torch.float32])
