"""The CUDA extension ``loraprune._C`` and its wrappers (``loraprune/ops/cuda.py``).

On any machine: the build (``LORAPRUNE_EXPECT_CUDA_EXTENSION=1`` makes a missing extension a
failure), the binding's argument checks, and clear errors without the extension or a GPU. With a
GPU (``requires_cuda``): each kernel against the PyTorch reference on fresh random inputs, odd
shapes and ranks, the three weight dtypes, poisoned outputs, strided inputs, large sizes.
"""

from __future__ import annotations

import importlib
import os
import sys
import types

import pytest
import torch
from conftest import requires_cuda
from quantized_weights import QUANTIZED_KINDS, bitsandbytes_weight, moved

from loraprune import ops
from loraprune.ops import BackendUnavailableError
from loraprune.ops import cuda as cuda_ops
from loraprune.ops.compact_linear import compact_linear_reference
from loraprune.ops.lora_importance import lora_importance_reference
from loraprune.ops.score_update import score_update_reference
from loraprune.ops.taylor_importance import taylor_importance_reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _extension_or_skip() -> types.ModuleType:
    try:
        return cuda_ops.extension()
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))


# --- any machine --------------------------------------------------------------------------------


def test_extension_imports_when_expected():
    if os.environ.get("LORAPRUNE_EXPECT_CUDA_EXTENSION") != "1":
        pytest.skip("LORAPRUNE_EXPECT_CUDA_EXTENSION is not 1 (set by CI where nvcc builds the extension)")
    import loraprune._C as ext

    assert ext.CUDA_RUNTIME_VERSION >= 12000
    assert ext.CUDA_ARCHITECTURES
    for name in (
        "lora_importance",
        "lora_importance_workspace_floats",
        "taylor_importance",
        "taylor_importance_workspace_floats",
        "score_update",
        "compact_linear",
    ):
        assert callable(getattr(ext, name))
    codes = [ext.DTYPE_FLOAT32, ext.DTYPE_FLOAT16, ext.DTYPE_BFLOAT16]
    assert [cuda_ops.DTYPE_CODES[d] for d in DTYPES] == codes
    formats = [ext.WEIGHT_DENSE, ext.WEIGHT_INT8, ext.WEIGHT_FOUR_BIT]
    assert formats == [cuda_ops.WEIGHT_DENSE, cuda_ops.WEIGHT_INT8, cuda_ops.WEIGHT_FOUR_BIT]


def test_binding_rejects_bad_arguments_before_touching_the_device():
    ext = _extension_or_skip()
    assert ext.lora_importance_workspace_floats(0, 5) == 0
    assert ext.lora_importance_workspace_floats(1000, 1376) >= 1000 + 1376
    common = dict(device=0, stream=0, weight=256, out_features=4, in_features=4, weight_row_stride=4)
    with pytest.raises(ValueError, match="rank"):
        ext.lora_importance(
            **common,
            dtype=0,
            lora_a=256,
            lora_b=256,
            grad_a=256,
            grad_b=256,
            rank=0,
            scaling=1.0,
            squared=False,
            row_sums=256,
            col_sums=256,
            workspace=256,
            workspace_floats=1 << 20,
        )
    with pytest.raises(ValueError, match="dtype"):
        ext.compact_linear(
            **common,
            dtype=7,
            lora_a=0,
            lora_b=0,
            rank=0,
            scaling=1.0,
            rows=0,
            num_rows=4,
            cols=0,
            num_cols=4,
            out=256,
        )
    with pytest.raises(ValueError, match="multiple of num_units"):
        ext.score_update(
            device=0,
            stream=0,
            scores=256,
            num_units=3,
            parts=[256],
            part_lengths=[4],
            part_strides=[1],
            part_dtypes=[0],
            decay=0.5,
            num_updates=256,
            num_skipped=256,
        )


def test_binding_rejects_bad_quantized_weights_before_touching_the_device():
    ext = _extension_or_skip()
    common = dict(
        device=0, stream=0, weight=256, dtype=0, out_features=4, in_features=64, weight_row_stride=64,
        lora_a=256, lora_b=256, grad_a=256, grad_b=256, rank=2, scaling=1.0, squared=False, row_sums=256,
        col_sums=256, workspace=256, workspace_floats=1 << 20,
    )  # fmt: skip
    taylor_common = dict(
        device=0, stream=0, x=256, grad_y=256, dtype=0, tokens=8, out_features=4, in_features=64,
        x_row_stride=64, grad_row_stride=4, weight=256, weight_dtype=0, weight_row_stride=64, lora_a=256,
        lora_b=256, rank=2, scaling=1.0, squared=False, row_sums=256, col_sums=256, workspace=256,
        workspace_floats=1 << 20,
    )  # fmt: skip
    for launch, args in ((ext.lora_importance, common), (ext.taylor_importance, taylor_common)):
        with pytest.raises(ValueError, match="weight format"):
            launch(**args, weight_format=7)
        with pytest.raises(ValueError, match="row scales"):
            launch(**args, weight_format=cuda_ops.WEIGHT_INT8)
        with pytest.raises(ValueError, match="blocksize"):
            launch(
                **args,
                weight_format=cuda_ops.WEIGHT_FOUR_BIT,
                weight_scales=256,
                weight_code=256,
                weight_blocksize=48,
            )
        with pytest.raises(ValueError, match="scales or code"):
            launch(**args, weight_format=cuda_ops.WEIGHT_FOUR_BIT, weight_scales=256, weight_blocksize=64)


def test_factor_staging_is_chosen_by_its_variable(monkeypatch):
    monkeypatch.delenv(cuda_ops.FACTOR_STAGING_ENV, raising=False)
    assert cuda_ops.factor_staging() == "double"
    monkeypatch.setenv(cuda_ops.FACTOR_STAGING_ENV, "single")
    assert cuda_ops.factor_staging() == "single"
    monkeypatch.setenv(cuda_ops.FACTOR_STAGING_ENV, "triple")
    with pytest.raises(ValueError, match=cuda_ops.FACTOR_STAGING_ENV):
        cuda_ops.factor_staging()


def test_wrappers_hand_the_binding_a_quantized_weight_packed(monkeypatch):
    """The packed codes, scales, code and format reach the binding in place (a fake extension
    records the call; CPU tensors stand in for CUDA ones)."""
    calls = {}
    fake = types.ModuleType("loraprune._C")
    fake.lora_importance = lambda **kwargs: calls.__setitem__("lora", kwargs)
    fake.taylor_importance = lambda **kwargs: calls.__setitem__("taylor", kwargs)
    fake.lora_importance_workspace_floats = fake.taylor_importance_workspace_floats = lambda out, inp: 1
    monkeypatch.setitem(sys.modules, "loraprune._C", fake)
    monkeypatch.setattr(cuda_ops, "_common_cuda_device", lambda op, tensors: torch.device("cpu"))
    monkeypatch.setattr(cuda_ops, "_current_stream", lambda device: 0)
    monkeypatch.delenv(cuda_ops.FACTOR_STAGING_ENV, raising=False)
    for kind, format_code in (("int8", cuda_ops.WEIGHT_INT8), ("nf4", cuda_ops.WEIGHT_FOUR_BIT)):
        weight, _ = bitsandbytes_weight(kind, 8, 64, seed=0)
        _, a, b, ga, gb = _importance_inputs(8, 64, 3, torch.float32, torch.float32, "cpu")
        for staging, double_buffer in (("single", False), (None, True)):
            cuda_ops.lora_importance(weight, a, b, ga, gb, 1.0, False, staging=staging)
            assert calls["lora"]["double_buffer"] is double_buffer
        cuda_ops.taylor_importance(torch.randn(5, 64), torch.randn(5, 8), weight, a, b, 1.0, False)
        for call in (calls["lora"], calls["taylor"]):
            assert call["weight"] == weight.data.data_ptr() and call["weight_format"] == format_code
            assert call["weight_scales"] == weight.scales.data_ptr()
            assert call.get("weight_row_stride") == 64
            if kind == "nf4":
                assert call["weight_code"] == weight.code.data_ptr() and call["weight_blocksize"] == 64


def test_importing_the_wrappers_needs_no_extension(monkeypatch):
    monkeypatch.setitem(sys.modules, "loraprune._C", None)  # makes `import loraprune._C` fail
    monkeypatch.delitem(sys.modules, "loraprune.ops.cuda")
    monkeypatch.setattr(ops, "cuda", cuda_ops)  # the re-import rebinds it; restored afterwards
    fresh = importlib.import_module("loraprune.ops.cuda")
    assert fresh is not cuda_ops
    with pytest.raises(BackendUnavailableError, match=r"LORAPRUNE_FORCE_CUDA_BUILD=1 pip install"):
        fresh.extension()


def test_wrappers_without_extension_raise_how_to_build(monkeypatch):
    monkeypatch.setitem(sys.modules, "loraprune._C", None)  # makes `import loraprune._C` fail
    w, a, b, ga, gb = _importance_inputs(8, 16, 2, torch.float32, torch.float32, "cpu")
    with pytest.raises(BackendUnavailableError, match=r"not available.*pip install"):
        cuda_ops.lora_importance(w, a, b, ga, gb, 1.0, False)
    with pytest.raises(BackendUnavailableError, match="pip install"):
        cuda_ops.compact_linear(w, None, None, None, 1.0, None, None)
    with pytest.raises(BackendUnavailableError, match="pip install"):
        cuda_ops.score_update(
            torch.zeros(2),
            [torch.ones(4)],
            0.5,
            torch.zeros((), dtype=torch.int64),
            torch.zeros((), dtype=torch.int64),
        )


def test_wrappers_reject_cpu_tensors(monkeypatch):
    def never_called(**kwargs):
        raise AssertionError("the wrapper launched on CPU tensors")

    fake = types.ModuleType("loraprune._C")
    fake.lora_importance = fake.score_update = fake.compact_linear = never_called
    fake.lora_importance_workspace_floats = lambda out_features, in_features: 0
    monkeypatch.setitem(sys.modules, "loraprune._C", fake)
    w, a, b, ga, gb = _importance_inputs(8, 16, 2, torch.float16, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"weight is on cpu.*CUDA tensors"):
        cuda_ops.lora_importance(w, a, b, ga, gb, 1.0, False)
    with pytest.raises(ValueError, match="CUDA tensors"):
        cuda_ops.compact_linear(w, None, a, b, 1.0, None, torch.arange(3))
    counter = torch.zeros((), dtype=torch.int64)
    with pytest.raises(ValueError, match="CUDA tensors"):
        cuda_ops.score_update(torch.zeros(2), [torch.ones(4)], 0.5, counter, counter.clone())


def test_forced_cuda_backend_on_cpu_tensors_is_unavailable():
    w, a, b, ga, gb = _importance_inputs(8, 16, 2, torch.float32, torch.float32, "cpu")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        ops.lora_importance(w, a, b, ga, gb, 2.0, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        ops.compact_linear(w, None, a, b, 2.0, torch.arange(4), None, backend="cuda")
    counter = torch.zeros((), dtype=torch.int64)
    with pytest.raises(BackendUnavailableError, match="cuda"):
        ops.score_update(torch.zeros(2), [torch.ones(4)], 0.5, counter, counter.clone(), backend="cuda")


# --- helpers ------------------------------------------------------------------------------------


def _importance_inputs(
    out_features: int,
    in_features: int,
    rank: int,
    dtype: torch.dtype,
    factor_dtype: torch.dtype,
    device,
    seed: int = 0,
) -> list[torch.Tensor]:
    """W (dtype), A, B, gA, gB (factor_dtype): random, never zero, LoRA-like magnitudes."""
    g = torch.Generator().manual_seed(seed)

    def rand(shape, scale, dt):
        return (torch.randn(shape, generator=g) * scale).to(dt).to(device)

    return [
        rand((out_features, in_features), 0.05, dtype),
        rand((rank, in_features), 0.1, factor_dtype),
        rand((out_features, rank), 0.1, factor_dtype),
        rand((rank, in_features), 0.01, factor_dtype),
        rand((out_features, rank), 0.01, factor_dtype),
    ]


def _importance_error_bound(w, a, b, ga, gb, scaling: float, squared: bool, row_chunk: int = 4096):
    """Row and column bounds on |kernel − exact| for TF32 rank products (float64, chunked by rows).

    Each product's two TF32 roundings cost at most 2^-10 relative, the fp32 accumulation over r
    ranks (tensor cores may truncate) at most r·2^-22; summed as |terms|, that bounds the error
    of G and of B·A per element, then of G ⊙ (W + s·B·A) and its square, then of the sums.
    """
    a, b, ga, gb = (t.double() for t in (a, b, ga, gb))
    unit = 2.0**-10 + a.shape[0] * 2.0**-22
    rows, cols = [], 0
    for r0 in range(0, w.shape[0], row_chunk):
        bs, gbs = b[r0 : r0 + row_chunk], gb[r0 : r0 + row_chunk]
        grad = gbs @ (a - ga) + bs @ ga
        merged = w[r0 : r0 + row_chunk].double() + scaling * (bs @ a)
        d_grad = unit * (gbs.abs() @ (a - ga).abs() + bs.abs() @ ga.abs())
        d_merged = abs(scaling) * unit * (bs.abs() @ a.abs())
        d_elem = d_grad * (merged.abs() + d_merged) + grad.abs() * d_merged
        if squared:
            d_elem = d_elem * (2 * (grad * merged).abs() + d_elem)
        rows.append(d_elem.sum(1))
        cols = cols + d_elem.sum(0)
    return torch.cat(rows), cols


def _assert_within(actual, expected, bound, what: str, relative_slack: float = 3e-4):
    """|actual − expected| <= bound + slack·|expected| (the slack covers fp32 summation order)."""
    actual, expected, bound = actual.double().cpu(), expected.double().cpu(), bound.double().cpu()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    excess = (actual - expected).abs() - (bound + relative_slack * expected.abs() + 1e-30)
    worst = int(excess.argmax())
    assert excess[worst] <= 0, (
        f"{what}: index {worst} got {actual[worst].item():.8g}, expected {expected[worst].item():.8g} "
        f"(allowed error {bound[worst].item() + relative_slack * expected[worst].abs().item():.3g})"
    )


def _check_importance(w, a, b, ga, gb, scaling: float, squared: bool, what: str):
    rows, cols = ops.lora_importance(w, a, b, ga, gb, scaling, squared=squared, backend="cuda")
    assert rows.dtype == cols.dtype == torch.float32 and rows.device == w.device
    cpu = [t.cpu() for t in (w, a, b, ga, gb)]
    expected_rows, expected_cols = lora_importance_reference(*cpu, scaling, squared)
    bound_rows, bound_cols = _importance_error_bound(*cpu, scaling, squared)
    _assert_within(rows, expected_rows, bound_rows, f"{what} row sums")
    _assert_within(cols, expected_cols, bound_cols, f"{what} column sums")
    return rows, cols


# --- GPU: lora_importance -----------------------------------------------------------------------

IMPORTANCE_SHAPES = [  # (out, in, rank): tails in both tile directions, 1..13 rank chunks
    (1000, 1376, 7),
    (64, 128, 1),
    (257, 1001, 64),  # in*2 bytes not a multiple of 16: the scalar W path for fp16/bf16
    (130, 264, 128),
    (3, 5, 16),
    (70, 136, 200),
]


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", IMPORTANCE_SHAPES, ids=str)
@pytest.mark.parametrize("squared", [False, True], ids=["abs", "squared"])
def test_lora_importance_matches_reference(dtype, shape, squared):
    out_features, in_features, rank = shape
    inputs = _importance_inputs(out_features, in_features, rank, dtype, torch.float32, "cuda", seed=rank)
    _check_importance(*inputs, 2.0, squared, f"{dtype} {shape}")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_lora_importance_factors_in_weight_dtype(dtype):
    inputs = _importance_inputs(300, 520, 16, dtype, dtype, "cuda", seed=3)
    _check_importance(*inputs, 0.5, False, f"{dtype} factors")


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lora_importance_strided_inputs(dtype):
    w, a, b, ga, gb = _importance_inputs(200, 392, 12, dtype, torch.float32, "cuda", seed=5)
    wide = torch.randn(200, 400, device="cuda").to(dtype)
    aligned_view = wide[:, :392]  # row stride 400: 16-byte copies at a wider pitch
    aligned_view.copy_(w)
    shifted_view = wide[:, 3:395]  # base off 16-byte alignment: the scalar W path
    shifted_view.copy_(w)
    transposed = w.t().contiguous().t()  # column stride != 1: copied by the wrapper
    a_strided = a.t().contiguous().t()
    for weight, what in (
        (aligned_view, "row-strided"),
        (shifted_view, "misaligned"),
        (transposed, "transposed"),
    ):
        _check_importance(weight, a_strided, b, ga, gb, 1.5, False, f"{dtype} {what} W")


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lora_importance_writes_every_output_deterministically(dtype):
    ext = cuda_ops.extension()
    w, a, b, ga, gb = _importance_inputs(1000, 1376, 9, dtype, torch.float32, "cuda", seed=11)
    expected_rows, expected_cols = cuda_ops.lora_importance(w, a, b, ga, gb, 2.0, False)
    floats = ext.lora_importance_workspace_floats(*w.shape)
    rows = torch.full((w.shape[0],), float("nan"), device="cuda")
    cols = torch.full((w.shape[1],), float("nan"), device="cuda")
    workspace = torch.full((floats,), float("nan"), device="cuda")
    ext.lora_importance(
        device=w.device.index,
        stream=torch.cuda.current_stream().cuda_stream,
        weight=w.data_ptr(),
        dtype=cuda_ops.DTYPE_CODES[dtype],
        out_features=w.shape[0],
        in_features=w.shape[1],
        weight_row_stride=w.stride(0),
        lora_a=a.data_ptr(),
        lora_b=b.data_ptr(),
        grad_a=ga.data_ptr(),
        grad_b=gb.data_ptr(),
        rank=a.shape[0],
        scaling=2.0,
        squared=False,
        row_sums=rows.data_ptr(),
        col_sums=cols.data_ptr(),
        workspace=workspace.data_ptr(),
        workspace_floats=floats,
    )
    assert torch.equal(rows, expected_rows) and torch.equal(
        cols, expected_cols
    )  # finite, and bitwise repeatable


@requires_cuda
def test_lora_importance_on_a_side_stream_and_mixed_devices():
    w, a, b, ga, gb = _importance_inputs(256, 384, 8, torch.bfloat16, torch.float32, "cuda", seed=2)
    expected = cuda_ops.lora_importance(w, a, b, ga, gb, 1.0, True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = cuda_ops.lora_importance(w, a, b, ga, gb, 1.0, True)
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    with pytest.raises(ValueError, match="lora_a is on cpu"):
        cuda_ops.lora_importance(w, a.cpu(), b, ga, gb, 1.0, False)


@requires_cuda
@pytest.mark.slow
def test_lora_importance_beyond_int32_elements(monkeypatch):
    out_features, in_features = 65536, 32800  # 2.15e9 elements, 4.3 GB in fp16
    if torch.cuda.mem_get_info()[0] < 24 * 2**30:
        pytest.skip("needs 24 GiB of free GPU memory")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    g = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(out_features, in_features, device="cuda", generator=g) * 0.05).half()
    a, b, ga, gb = (
        torch.randn(shape, device="cuda", generator=g) * scale
        for shape, scale in (
            ((8, in_features), 0.1),
            ((out_features, 8), 0.1),
            ((8, in_features), 0.01),
            ((out_features, 8), 0.01),
        )
    )
    rows, cols = ops.lora_importance(w, a, b, ga, gb, 2.0, backend="cuda")
    expected_rows, expected_cols = [], 0
    for r0 in range(0, out_features, 4096):
        sl = slice(r0, r0 + 4096)
        grad = gb[sl].double() @ (a - ga).double() + b[sl].double() @ ga.double()
        element = (grad * (w[sl].double() + 2.0 * (b[sl].double() @ a.double()))).abs()
        expected_rows.append(element.sum(1))
        expected_cols = expected_cols + element.sum(0)
        del grad, element
    bound_rows, bound_cols = _importance_error_bound(w, a, b, ga, gb, 2.0, False)
    _assert_within(rows, torch.cat(expected_rows), bound_rows, "large row sums", relative_slack=1e-3)
    _assert_within(cols, expected_cols, bound_cols, "large column sums", relative_slack=1e-3)


STAGING_SHAPES = [
    *IMPORTANCE_SHAPES,
    (100, 130, 6),  # rank and in_features not multiples of 4: the 4-byte factor copies
    (129, 260, 33),  # three rank chunks, the last one partial
]


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", STAGING_SHAPES, ids=str)
def test_lora_importance_factor_stagings_agree_with_reference_and_each_other(dtype, shape):
    """Double buffering changes when the factors arrive, not the arithmetic: the same TF32 values
    meet in the same MMA order, so both stagings give bit-identical sums."""
    out_features, in_features, rank = shape
    w, a, b, ga, gb = _importance_inputs(
        out_features, in_features, rank, dtype, torch.float32, "cuda", seed=rank
    )
    cpu = [t.cpu() for t in (w, a, b, ga, gb)]
    for squared in (False, True):
        expected = lora_importance_reference(*cpu, 2.0, squared)
        bounds = _importance_error_bound(*cpu, 2.0, squared)
        results = {}
        for staging in cuda_ops.FACTOR_STAGINGS:
            results[staging] = cuda_ops.lora_importance(w, a, b, ga, gb, 2.0, squared, staging=staging)
            for got, want, bound, name in zip(
                results[staging], expected, bounds, ("row", "column"), strict=True
            ):
                _assert_within(got, want, bound, f"{dtype} {shape} {staging} {name} sums")
        for single, double in zip(results["single"], results["double"], strict=True):
            assert torch.equal(single, double)


QUANTIZED_CUDA_SHAPES = [  # (out, in, rank)
    (300, 1024, 8),  # 16-byte copies of the codes (int8 and 4-bit)
    (257, 1040, 16),  # int8 16-byte copies; 4-bit rows not 16-byte aligned: scalar copies
    (70, 1001, 5),  # odd width: 4-bit rows start mid-byte, blocks straddle rows; scalar copies
]


@requires_cuda
@pytest.mark.parametrize("staging", ["double", "single"])
@pytest.mark.parametrize("shape", QUANTIZED_CUDA_SHAPES, ids=str)
@pytest.mark.parametrize("kind", QUANTIZED_KINDS)
def test_lora_importance_of_a_quantized_weight(kind, shape, staging):
    out_features, in_features, rank = shape
    weight, dequantized = bitsandbytes_weight(kind, out_features, in_features, seed=rank, device="cuda")
    _, a, b, ga, gb = _importance_inputs(
        out_features, in_features, rank, torch.float32, torch.float32, "cuda"
    )
    cpu = [t.cpu() for t in (dequantized, a, b, ga, gb)]
    for squared in (False, True):
        rows, cols = cuda_ops.lora_importance(weight, a, b, ga, gb, 2.0, squared, staging=staging)
        through_ops = ops.lora_importance(weight, a, b, ga, gb, 2.0, squared=squared, backend="cuda")
        expected = lora_importance_reference(*cpu, 2.0, squared)
        bounds = _importance_error_bound(*cpu, 2.0, squared)
        for got, want, bound, name in zip((rows, cols), expected, bounds, ("row", "column"), strict=True):
            _assert_within(got, want, bound, f"{kind} {shape} {staging} {name} sums")
        if staging == cuda_ops.factor_staging():
            assert all(torch.equal(x, y) for x, y in zip((rows, cols), through_ops, strict=True))


# --- taylor_importance ----------------------------------------------------------------------------


def _taylor_inputs(
    tokens: int,
    out_features: int,
    in_features: int,
    rank: int,
    dtype: torch.dtype,
    device,
    *,
    weight_dtype: torch.dtype | None = None,
    grad_dtype: torch.dtype | None = None,
    seed: int = 0,
) -> list:
    """X, dY (dtype), W (weight_dtype or dtype), A, B (float32; None for rank 0): random, never zero."""
    g = torch.Generator().manual_seed(seed)

    def rand(shape, scale, dt):
        return (torch.randn(shape, generator=g) * scale).to(dt).to(device)

    factors = [None, None]
    if rank:
        factors = [
            rand((rank, in_features), 0.1, torch.float32),
            rand((out_features, rank), 0.1, torch.float32),
        ]
    return [
        rand((tokens, in_features), 1.0, dtype),
        rand((tokens, out_features), 1e-2, grad_dtype or dtype),
        rand((out_features, in_features), 0.05, weight_dtype or dtype),
        *factors,
    ]


def _check_taylor(inputs, scaling: float, squared: bool, what: str, relative_slack: float = 1e-4):
    """fp16/bf16 products are exact and float32 goes through 3xTF32, so the kernel differs from the
    float32 reference by summation order: within relative_slack of each sum, plus 1e-6 of the largest."""
    rows, cols = ops.taylor_importance(*inputs, scaling, squared=squared, backend="cuda")
    assert rows.dtype == cols.dtype == torch.float32 and rows.device == inputs[0].device
    cpu = [None if t is None else t.cpu() for t in inputs]
    for got, want, name in zip(
        (rows, cols), taylor_importance_reference(*cpu, scaling, squared), ("row", "column"), strict=True
    ):
        floor = torch.full_like(want, 1e-6 * want.abs().max().item(), dtype=torch.float64)
        _assert_within(got, want, floor, f"{what} {name} sums", relative_slack)
    return rows, cols


def test_taylor_binding_rejects_bad_arguments_before_touching_the_device():
    ext = _extension_or_skip()
    assert ext.taylor_importance_workspace_floats(0, 5) == 0
    assert ext.taylor_importance_workspace_floats(1000, 1376) >= 1000 + 1376
    common = dict(
        device=0, stream=0, x=256, grad_y=256, dtype=0, tokens=8, out_features=4, in_features=4,
        x_row_stride=4, grad_row_stride=4, weight=256, weight_dtype=0, weight_row_stride=4, lora_a=256,
        lora_b=256, scaling=1.0, squared=False, row_sums=256, col_sums=256, workspace=256,
        workspace_floats=1 << 20,
    )  # fmt: skip
    with pytest.raises(ValueError, match="rank"):
        ext.taylor_importance(**{**common, "rank": -1})
    with pytest.raises(ValueError, match="tokens"):
        ext.taylor_importance(**{**common, "rank": 2, "tokens": -1})
    with pytest.raises(ValueError, match="dtype"):
        ext.taylor_importance(**{**common, "rank": 2, "dtype": 7})
    with pytest.raises(ValueError, match="workspace"):
        ext.taylor_importance(**{**common, "rank": 2, "workspace_floats": 1})


def test_taylor_wrapper_without_extension_or_on_cpu_tensors(monkeypatch):
    inputs = _taylor_inputs(6, 8, 16, 2, torch.float32, "cpu")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        ops.taylor_importance(*inputs, 1.0, backend="cuda")
    monkeypatch.setitem(sys.modules, "loraprune._C", None)  # makes `import loraprune._C` fail
    with pytest.raises(BackendUnavailableError, match=r"not available.*pip install"):
        cuda_ops.taylor_importance(*inputs, 1.0, False)

    def never_called(**kwargs):
        raise AssertionError("the wrapper launched on CPU tensors")

    fake = types.ModuleType("loraprune._C")
    fake.taylor_importance = never_called
    fake.taylor_importance_workspace_floats = lambda out_features, in_features: 0
    monkeypatch.setitem(sys.modules, "loraprune._C", fake)
    with pytest.raises(ValueError, match=r"x is on cpu.*CUDA tensors"):
        cuda_ops.taylor_importance(*inputs, 1.0, False)


TAYLOR_SHAPES = [  # (tokens, out, in, rank): tails in every tile direction and in the 32-token chunks
    (300, 1000, 1376, 7),
    (1, 64, 128, 1),
    (77, 257, 1001, 64),
    (33, 130, 264, 0),
    (5, 3, 5, 16),
    (40, 70, 136, 200),
]


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", TAYLOR_SHAPES, ids=str)
@pytest.mark.parametrize("squared", [False, True], ids=["abs", "squared"])
def test_taylor_importance_matches_reference(dtype, shape, squared):
    inputs = _taylor_inputs(*shape, dtype, "cuda", seed=sum(shape))
    _check_taylor(inputs, 2.0, squared, f"{dtype} {shape}")


@requires_cuda
def test_taylor_importance_mixed_dtypes():
    """bf16 X with float32 dY (both cast to float32 by the wrapper) and a float16 W."""
    inputs = _taylor_inputs(
        50, 200, 300, 8, torch.bfloat16, "cuda", weight_dtype=torch.float16, grad_dtype=torch.float32, seed=4
    )
    _check_taylor(inputs, 0.5, False, "mixed dtypes")


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_taylor_importance_strided_inputs(dtype):
    x, dy, w, a, b = _taylor_inputs(64, 200, 392, 12, dtype, "cuda", seed=5)
    wide_x = torch.randn(64, 400, device="cuda").to(dtype)
    wide_x[:, 3:395] = x  # row stride 400, base off alignment
    wide_w = torch.randn(200, 400, device="cuda").to(dtype)
    wide_w[:, :392] = w
    strided = [wide_x[:, 3:395], dy.t().contiguous().t(), wide_w[:, :392], a.t().contiguous().t(), b]
    _check_taylor(strided, 1.5, False, f"{dtype} strided")
    _check_taylor([x, dy, w.t().contiguous().t(), a, b], 1.5, True, f"{dtype} transposed W")


@requires_cuda
def test_taylor_importance_zero_tokens():
    inputs = _taylor_inputs(0, 40, 70, 4, torch.bfloat16, "cuda")
    rows, cols = ops.taylor_importance(*inputs, 1.0, backend="cuda")
    assert torch.equal(rows, torch.zeros(40, device="cuda")) and torch.equal(
        cols, torch.zeros(70, device="cuda")
    )


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_taylor_importance_writes_every_output_deterministically(dtype):
    ext = cuda_ops.extension()
    x, dy, w, a, b = _taylor_inputs(129, 1000, 1376, 9, dtype, "cuda", seed=11)
    expected_rows, expected_cols = cuda_ops.taylor_importance(x, dy, w, a, b, 2.0, False)
    floats = ext.taylor_importance_workspace_floats(*w.shape)
    rows = torch.full((w.shape[0],), float("nan"), device="cuda")
    cols = torch.full((w.shape[1],), float("nan"), device="cuda")
    workspace = torch.full((floats,), float("nan"), device="cuda")
    ext.taylor_importance(
        device=w.device.index,
        stream=torch.cuda.current_stream().cuda_stream,
        x=x.data_ptr(),
        grad_y=dy.data_ptr(),
        dtype=cuda_ops.DTYPE_CODES[dtype],
        tokens=x.shape[0],
        out_features=w.shape[0],
        in_features=w.shape[1],
        x_row_stride=x.stride(0),
        grad_row_stride=dy.stride(0),
        weight=w.data_ptr(),
        weight_dtype=cuda_ops.DTYPE_CODES[dtype],
        weight_row_stride=w.stride(0),
        lora_a=a.data_ptr(),
        lora_b=b.data_ptr(),
        rank=a.shape[0],
        scaling=2.0,
        squared=False,
        row_sums=rows.data_ptr(),
        col_sums=cols.data_ptr(),
        workspace=workspace.data_ptr(),
        workspace_floats=floats,
    )
    assert torch.equal(rows, expected_rows) and torch.equal(cols, expected_cols)  # bitwise repeatable


# --- GPU: score_update --------------------------------------------------------------------------


def _score_parts(num_units: int, device, seed: int) -> list[torch.Tensor]:
    """Parts as the pruner makes them: head rows (chunk 4), GQA rows (chunk 8), channels, mixed dtypes."""
    g = torch.Generator().manual_seed(seed)
    lengths_and_dtypes = ((4, torch.float32), (8, torch.float16), (1, torch.bfloat16), (4, torch.float32))
    return [(torch.rand(num_units * c, generator=g) + 0.01).to(dt).to(device) for c, dt in lengths_and_dtypes]


@requires_cuda
@pytest.mark.parametrize("num_units", [1, 7, 32, 1000, 11008])
def test_score_update_matches_reference_over_steps(num_units):
    scores = torch.full((num_units,), float("nan"), device="cuda")  # the first update must overwrite all
    expected = scores.cpu()
    counters = [torch.zeros((), dtype=torch.int64, device="cuda") for _ in range(2)]
    expected_counters = [torch.zeros((), dtype=torch.int64) for _ in range(2)]
    for step in range(5):
        parts = _score_parts(num_units, "cuda", seed=step)
        if step == 2:
            parts[1][num_units // 2] = float("nan")
        if step == 3:
            parts[0][-1] = float("inf")
        if step == 4:
            parts.append(torch.zeros(num_units * 2, device="cuda"))  # a zero part contributes zeros
        ops.score_update(scores, parts, 0.9, *counters, backend="cuda")
        score_update_reference(expected, [p.cpu() for p in parts], 0.9, *expected_counters)
        torch.testing.assert_close(scores.cpu(), expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())
        assert [int(c) for c in counters] == [int(c) for c in expected_counters]
    assert [int(c) for c in counters] == [3, 2]


@requires_cuda
def test_score_update_strided_parts_and_eight_of_them():
    num_units = 300
    scores = torch.rand(num_units, device="cuda")
    expected = scores.cpu()
    counters = [
        torch.ones((), dtype=torch.int64, device="cuda"),
        torch.zeros((), dtype=torch.int64, device="cuda"),
    ]
    expected_counters = [c.cpu() for c in counters]
    wide = torch.rand(num_units * 3, 4, device="cuda")
    parts = [wide[:, i % 4] for i in range(7)] + [wide[::3, 1]]  # strides 4 and 12, chunks 3 and 1
    ops.score_update(scores, parts, 0.5, *counters, backend="cuda")
    score_update_reference(expected, [p.cpu() for p in parts], 0.5, *expected_counters)
    torch.testing.assert_close(scores.cpu(), expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())
    assert [int(c) for c in counters] == [2, 0]


# --- GPU: compact_linear ------------------------------------------------------------------------

TOLERANCES = {  # one rounding of the fp32 merge to the dtype may land one ulp apart
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2.0**-10, atol=1e-6),
    torch.bfloat16: dict(rtol=2.0**-7, atol=1e-5),
}


def _compact_case(out_features: int, in_features: int, rank: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(out_features, in_features, generator=g) * 0.05).to(dtype).cuda()
    bias = torch.randn(out_features, generator=g).to(dtype).cuda()
    a = (torch.randn(rank, in_features, generator=g) * 0.1).cuda()
    b = (torch.randn(out_features, rank, generator=g) * 0.1).cuda()
    rows = torch.randperm(out_features, generator=g)[: max(1, out_features * 3 // 4)].cuda()  # unsorted
    cols = torch.randperm(in_features, generator=g)[: max(1, in_features // 2)].sort().values.cuda()
    return w, bias, a, b, rows, cols


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1000, 1376, 7), (257, 1001, 64), (64, 128, 1), (33, 70, 200)], ids=str)
@pytest.mark.parametrize("keep", ["rows+cols", "rows", "cols", "all"])
def test_compact_linear_matches_reference(dtype, shape, keep):
    w, bias, a, b, rows, cols = _compact_case(*shape, dtype, seed=shape[2])
    rows = rows if "rows" in keep else None
    cols = cols if "cols" in keep else None
    got_w, got_b = ops.compact_linear(w, bias, a, b, 2.0, rows, cols, backend="cuda")
    expected_w, expected_b = compact_linear_reference(
        w.cpu(),
        bias.cpu(),
        a.cpu(),
        b.cpu(),
        2.0,
        None if rows is None else rows.cpu(),
        None if cols is None else cols.cpu(),
    )
    assert got_w.dtype == dtype and got_w.is_contiguous() and got_w.shape == expected_w.shape
    torch.testing.assert_close(got_w.cpu(), expected_w, **TOLERANCES[dtype])
    assert torch.equal(got_b.cpu(), expected_b)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_compact_linear_without_lora_is_an_exact_gather(dtype):
    w, _, _, _, rows, cols = _compact_case(300, 520, 1, dtype, seed=1)
    rows = torch.cat([rows, rows[:5]])  # repeated indices are allowed
    got_w, got_b = ops.compact_linear(w, None, None, None, 1.0, rows, cols, backend="cuda")
    assert torch.equal(got_w, w[rows][:, cols]) and got_b is None


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_compact_linear_writes_every_output_and_takes_strided_inputs(dtype):
    ext = cuda_ops.extension()
    w, _, a, b, rows, cols = _compact_case(500, 700, 24, dtype, seed=4)
    wide = torch.zeros(500, 709, dtype=dtype, device="cuda")
    strided_w = wide[:, 9:]
    strided_w.copy_(w)
    every_other = torch.stack([rows, rows], 1).reshape(-1)[::2]  # non-contiguous index tensor
    expected, _ = ops.compact_linear(w, None, a, b, 2.0, rows, cols, backend="cuda")
    got, _ = ops.compact_linear(
        strided_w, None, a.t().contiguous().t(), b, 2.0, every_other, cols, backend="cuda"
    )
    assert torch.equal(got, expected)
    poisoned = torch.full(expected.shape, float("nan"), dtype=dtype, device="cuda")
    ext.compact_linear(
        device=w.device.index,
        stream=torch.cuda.current_stream().cuda_stream,
        weight=w.data_ptr(),
        dtype=cuda_ops.DTYPE_CODES[dtype],
        out_features=w.shape[0],
        in_features=w.shape[1],
        weight_row_stride=w.stride(0),
        lora_a=a.data_ptr(),
        lora_b=b.data_ptr(),
        rank=a.shape[0],
        scaling=2.0,
        rows=rows.data_ptr(),
        num_rows=rows.numel(),
        cols=cols.data_ptr(),
        num_cols=cols.numel(),
        out=poisoned.data_ptr(),
    )
    assert torch.equal(poisoned, expected)


@requires_cuda
@pytest.mark.slow
def test_compact_linear_beyond_int32_elements(monkeypatch):
    out_features, in_features = 65536, 32800
    if torch.cuda.mem_get_info()[0] < 16 * 2**30:
        pytest.skip("needs 16 GiB of free GPU memory")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    w = torch.randn(out_features, in_features, device="cuda", dtype=torch.float16)
    a = torch.randn(8, in_features, device="cuda") * 0.1
    b = torch.randn(out_features, 8, device="cuda") * 0.1
    cols = torch.arange(in_features - 20, device="cuda")  # 65536 × 32780 > 2^31 output elements
    got, _ = ops.compact_linear(w, None, a, b, 2.0, None, cols, backend="cuda")
    assert got.numel() > 2**31
    check = torch.tensor([0, 1, 4095, 32768, 65519, 65535], device="cuda")  # rows past 2^31 / 32780 too
    expected = (w[check].float() + 2.0 * (b[check] @ a))[:, cols].half()
    torch.testing.assert_close(got[check], expected, **TOLERANCES[torch.float16])


@requires_cuda
@pytest.mark.parametrize("shape", [(40, 300, 1024, 8), (33, 257, 1001, 0)], ids=str)
@pytest.mark.parametrize("kind", QUANTIZED_KINDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_taylor_importance_of_a_quantized_weight(dtype, kind, shape):
    """Against the reference on the packed weight and on bitsandbytes' dequantization of it, within
    the float32 summation-order slack of _check_taylor."""
    tokens, out_features, in_features, rank = shape
    x, grad_y, _, *factors = _taylor_inputs(tokens, out_features, in_features, rank, dtype, "cuda", seed=rank)
    weight, dequantized = bitsandbytes_weight(kind, out_features, in_features, seed=rank, device="cuda")
    cpu = [None if t is None else t.cpu() for t in (x, grad_y, *factors)]
    for squared in (False, True):
        got = ops.taylor_importance(x, grad_y, weight, *factors, 1.5, squared=squared, backend="cuda")
        for reference_weight in (moved(weight, "cpu"), dequantized.cpu()):
            expected = taylor_importance_reference(*cpu[:2], reference_weight, *cpu[2:], 1.5, squared)
            for sums, want, name in zip(got, expected, ("row", "column"), strict=True):
                floor = torch.full_like(want, 1e-6 * want.abs().max().item(), dtype=torch.float64)
                _assert_within(sums, want, floor, f"{dtype} {kind} {shape} {name} sums", 1e-4)
