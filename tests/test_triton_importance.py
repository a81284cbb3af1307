"""The Triton importance and score-update kernels against their PyTorch references.

Without a GPU the kernels run through the Triton interpreter in float32 at small odd shapes; the
float16/bfloat16 weights at LLaMA-7B shapes need a GPU.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TRITON_SKIP_REASON, requires_cuda
from quantized_weights import QUANTIZED_KINDS, bitsandbytes_weight

from loraprune import ops
from loraprune.ops.lora_importance import lora_importance_reference
from loraprune.ops.score_update import score_update_reference

if TRITON_SKIP_REASON:
    pytest.skip(TRITON_SKIP_REASON, allow_module_level=True)
from loraprune.kernels import lora_importance as importance_kernel
from loraprune.kernels import score_update as score_kernel

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Max error allowed, relative to the largest magnitude of the expected tensor. The kernels compute
# in float32 whatever the storage dtype, like the references.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.isfinite(actual).all()
    scale = max(expected.abs().max().item(), 1e-30)
    error = (actual - expected).abs().max().item()
    assert error <= tolerance * scale, f"max error {error:.3g} vs scale {scale:.3g}"


def make_factors(
    out_features: int,
    in_features: int,
    rank: int,
    *,
    weight_dtype=torch.float32,
    factor_dtype=torch.float32,
    seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, dtype):
        return torch.randn(shape, generator=g).to(device=DEVICE, dtype=dtype)

    return (
        randn(out_features, in_features, dtype=weight_dtype),
        randn(rank, in_features, dtype=factor_dtype),
        randn(out_features, rank, dtype=factor_dtype),
        randn(rank, in_features, dtype=factor_dtype),
        randn(out_features, rank, dtype=factor_dtype),
    )


# --- importance -----------------------------------------------------------------------------------

IMPORTANCE_SHAPES = {  # (out, in, rank)
    "odd": (100, 136, 7),
    "rank128": (24, 40, 128),
    "rank100_tall": (70, 17, 100),
    "rank1": (33, 65, 1),
}


@pytest.mark.parametrize("programs", [1, 64], ids=["one_split", "column_splits"])
@pytest.mark.parametrize("squared", [False, True], ids=["abs", "squared"])
@pytest.mark.parametrize("shape", IMPORTANCE_SHAPES.values(), ids=IMPORTANCE_SHAPES.keys())
def test_importance_matches_reference(monkeypatch, shape, squared, programs):
    """``programs`` fixes the target program count: 64 splits the columns of every row block."""
    monkeypatch.setattr(importance_kernel, "num_programs_target", lambda device: programs)
    factors = make_factors(*shape)
    rows, cols = importance_kernel.lora_importance(*factors, 0.8, squared)
    rows_ref, cols_ref = lora_importance_reference(*factors, 0.8, squared)
    assert_close(rows, rows_ref, TOLERANCE[torch.float32])
    assert_close(cols, cols_ref, TOLERANCE[torch.float32])


def test_importance_through_ops_and_strided_inputs():
    weight, a, b, ga, gb = make_factors(52, 90, 6, seed=3)
    expected = lora_importance_reference(weight, a, b, ga, gb, 2.0, squared=False)
    # Transposed views: the kernel takes any strides.
    strided = [t.t().contiguous().t() for t in (weight, a, b, ga, gb)]
    assert not strided[0].is_contiguous()
    actual = ops.lora_importance(*strided, 2.0, squared=False, backend="triton")
    for got, want in zip(actual, expected, strict=True):
        assert_close(got, want, TOLERANCE[torch.float32])


def test_importance_partials_fully_written(monkeypatch):
    monkeypatch.setattr(importance_kernel, "num_programs_target", lambda device: 64)
    factors = make_factors(45, 100, 9, seed=4)
    expected = lora_importance_reference(*factors, 1.0, squared=True)
    empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        return empty(*args, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    actual = importance_kernel.lora_importance(*factors, 1.0, True)
    monkeypatch.undo()
    for got, want in zip(actual, expected, strict=True):
        assert_close(got, want, TOLERANCE[torch.float32])


@requires_cuda
@pytest.mark.parametrize("rank", [8, 64])
@pytest.mark.parametrize("in_out", [(4096, 11008), (11008, 4096)], ids=["up", "down"])
@pytest.mark.parametrize("factor_dtype", ["float32", "weight"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_importance_llama_shapes_half_precision(dtype, factor_dtype, in_out, rank):
    in_features, out_features = in_out
    factors = make_factors(
        out_features,
        in_features,
        rank,
        weight_dtype=dtype,
        factor_dtype=torch.float32 if factor_dtype == "float32" else dtype,
    )
    for squared in (False, True):
        actual = importance_kernel.lora_importance(*factors, 0.5, squared)
        expected = lora_importance_reference(*factors, 0.5, squared)
        for got, want in zip(actual, expected, strict=True):
            assert_close(got, want, TOLERANCE[dtype])


# --- importance of a quantized W (dequantized as the kernel loads its tiles) ---------------------

QUANTIZED_SHAPES = {  # (out, in, rank): odd widths put 4-bit rows mid-byte and blocks across rows
    "odd": (37, 100, 5),
    "aligned": (64, 128, 16),
}


@pytest.mark.parametrize("squared", [False, True], ids=["abs", "squared"])
@pytest.mark.parametrize("factor_dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("shape", QUANTIZED_SHAPES.values(), ids=QUANTIZED_SHAPES.keys())
@pytest.mark.parametrize("kind", QUANTIZED_KINDS)
def test_importance_of_a_quantized_weight(kind, shape, factor_dtype, squared):
    """Against the reference on the packed weight and on bitsandbytes' own dequantization of it."""
    out_features, in_features, rank = shape
    weight, dequantized = bitsandbytes_weight(kind, out_features, in_features, seed=rank, device=DEVICE)
    _, *factors = make_factors(out_features, in_features, rank, factor_dtype=factor_dtype, seed=rank)
    actual = ops.lora_importance(weight, *factors, 0.8, squared=squared, backend="triton")
    for reference_weight in (weight, dequantized):
        expected = lora_importance_reference(reference_weight, *factors, 0.8, squared)
        for got, want in zip(actual, expected, strict=True):
            assert_close(got, want, TOLERANCE[torch.float32])


# --- score update ---------------------------------------------------------------------------------


def counters() -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.zeros((), dtype=torch.int64, device=DEVICE),
        torch.zeros((), dtype=torch.int64, device=DEVICE),
    )


def random_parts(
    num_units: int, widths: list[int], dtypes: list[torch.dtype], seed: int
) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.rand(num_units * w, generator=g) + 0.01).to(device=DEVICE, dtype=dt)
        for w, dt in zip(widths, dtypes, strict=True)
    ]


def poison(parts: list[torch.Tensor], value: float) -> list[torch.Tensor]:
    parts = [p.clone() for p in parts]
    parts[-1][parts[-1].numel() // 2] = value
    return parts


SCORE_GROUPS = {  # (units, fold widths, dtypes)
    "heads": (7, [16, 16, 48, 3], [torch.float32, torch.float16, torch.bfloat16, torch.float32]),
    "channels": (3001, [1, 1, 1], [torch.float32, torch.bfloat16, torch.float32]),
    "eight_parts": (5, [1, 2, 3, 4, 5, 6, 7, 300], [torch.float32] * 8),
}


@pytest.mark.parametrize("group", SCORE_GROUPS.values(), ids=SCORE_GROUPS.keys())
def test_score_update_sequence_matches_reference(group):
    """First update initialises, then EMA; NaN and Inf steps are skipped and counted; a zero part
    contributes zeros (its norm is clamped). Kernel and reference advance in lockstep."""
    num_units, widths, dtypes = group
    scores = torch.full((num_units,), float("nan"), device=DEVICE)  # never read before the first update
    scores_ref = scores.clone()
    state, state_ref = counters(), counters()
    steps = [
        poison(random_parts(num_units, widths, dtypes, seed=0), float("nan")),  # skipped before any update
        random_parts(num_units, widths, dtypes, seed=1),  # initialises
        random_parts(num_units, widths, dtypes, seed=2),
        poison(random_parts(num_units, widths, dtypes, seed=3), float("inf")),
        poison(random_parts(num_units, widths, dtypes, seed=4), float("-inf")),
        [torch.zeros_like(p) for p in random_parts(num_units, widths, dtypes, seed=5)[:-1]]
        + random_parts(num_units, widths[-1:], dtypes[-1:], seed=5),
        random_parts(num_units, widths, dtypes, seed=6),
    ]
    for step, parts in enumerate(steps):
        score_kernel.score_update(scores, parts, 0.9, *state)
        score_update_reference(scores_ref, parts, 0.9, *state_ref)
        assert torch.equal(state[0], state_ref[0]) and torch.equal(state[1], state_ref[1]), step
        if step == 0:
            assert torch.isnan(scores).all()  # the skipped step wrote nothing
        else:
            assert_close(scores, scores_ref, 1e-5)
    assert state[0].item() == 4 and state[1].item() == 3


def test_score_update_through_ops():
    num_units, widths = 9, [4, 8]
    parts = random_parts(num_units, widths, [torch.float32, torch.float32], seed=8)
    scores = torch.rand(num_units, device=DEVICE)
    scores_ref = scores.clone()
    state, state_ref = counters(), counters()
    state[0].fill_(3)  # an already-initialised average
    state_ref[0].fill_(3)
    ops.score_update(scores, parts, 0.75, *state, backend="triton")
    score_update_reference(scores_ref, parts, 0.75, *state_ref)
    assert_close(scores, scores_ref, 1e-5)
    assert state[0].item() == 4 and state[1].item() == 0
