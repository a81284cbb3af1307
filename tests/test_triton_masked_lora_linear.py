"""The Triton masked LoRA linear against its PyTorch reference, the specification.

Without a GPU the kernels run through the Triton interpreter in float32 at small odd shapes; the
float16/bfloat16 cases at LLaMA-7B shapes need a GPU. Through the interpreter, the loads the
kernels issue can be observed: that is how the gathering of output masks is checked.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TRITON_SKIP_REASON, requires_cuda

from loraprune import ops
from loraprune.ops._dispatch import triton_interpreter
from loraprune.ops.masked_lora_linear import (
    DEFAULT_FAST_PATHS,
    FAST_PATHS,
    K_TILE_WIDTHS,
    enabled_fast_paths,
    masked_lora_linear_plan,
    masked_lora_linear_reference,
)

if TRITON_SKIP_REASON:
    pytest.skip(TRITON_SKIP_REASON, allow_module_level=True)
from loraprune.kernels import masked_lora_linear as kernel

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Max error allowed, relative to the largest magnitude of the expected tensor.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
MASK_KINDS = ("absent", "out_only", "in_only", "both_random", "head_blocks", "all_masked", "none_masked")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.isfinite(actual).all()
    scale = max(expected.abs().max().item(), 1.0)
    error = (actual.float() - expected.float()).abs().max().item()
    assert error <= TOLERANCE[dtype] * scale, f"max error {error:.3g} vs scale {scale:.3g}"


def make_layer(
    lead: tuple[int, ...],
    in_features: int,
    out_features: int,
    rank: int,
    *,
    dtype=torch.float32,
    factor_dtype=torch.float32,
    bias: bool = True,
    seed: int = 0,
    device=DEVICE,
) -> dict:
    """Fresh random non-zero inputs (B too, unlike a LoRA init) with outputs of magnitude ~1."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, dt=dtype):
        return (torch.randn(shape, generator=g) * scale).to(device=device, dtype=dt)

    return {
        "x": randn(*lead, in_features).requires_grad_(),
        "weight": randn(out_features, in_features, scale=in_features**-0.5),
        "bias": randn(out_features) if bias else None,
        "lora_a": randn(rank, in_features, scale=in_features**-0.5, dt=factor_dtype).requires_grad_(),
        "lora_b": randn(out_features, rank, scale=rank**-0.5, dt=factor_dtype).requires_grad_(),
        "scaling": 1.7,
    }


def make_masks(kind: str, out_features: int, in_features: int, seed: int = 1, device=DEVICE):
    g = torch.Generator().manual_seed(seed)

    def random(n: int) -> torch.Tensor:
        return (torch.rand(n, generator=g) < 0.5).to(device)

    def head_blocks(n: int, unit: int = 16) -> torch.Tensor:
        """Head-like masks: whole units of ``unit`` features, the first two (a full 32-wide tile)
        pruned, the last kept."""
        units = torch.rand(math.ceil(n / unit), generator=g) < 0.5
        units[:2] = False
        units[-1] = True
        return units.repeat_interleave(unit)[:n].to(device)

    def constant(n: int, value: bool) -> torch.Tensor:
        return torch.full((n,), value, dtype=torch.bool, device=device)

    return {
        "absent": lambda: (None, None),
        "out_only": lambda: (random(out_features), None),
        "in_only": lambda: (None, random(in_features)),
        "both_random": lambda: (random(out_features), random(in_features)),
        "head_blocks": lambda: (head_blocks(out_features), head_blocks(in_features)),
        "all_masked": lambda: (constant(out_features, False), constant(in_features, False)),
        "none_masked": lambda: (constant(out_features, True), constant(in_features, True)),
    }[kind]()


def scattered_mask(n: int, num_masked: int, seed: int = 3, device=DEVICE) -> torch.Tensor:
    """A keep-mask with exactly ``num_masked`` features masked at random positions, as pruned MLP
    channels are: scattered, so that hardly any tile of consecutive features is fully masked."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=g)[:num_masked]] = False
    return mask.to(device)


def run(
    fn, layer: dict, out_mask, in_mask, dropout_p: float = 0.0, training: bool = False, grad_seed: int = 2
):
    """Forward and the gradients of x, lora_a, lora_b for a fixed random upstream gradient."""
    x, a, b = layer["x"], layer["lora_a"], layer["lora_b"]
    y = fn(x, layer["weight"], layer["bias"], a, b, layer["scaling"], out_mask, in_mask, dropout_p, training)
    g = torch.Generator().manual_seed(grad_seed)
    grad_y = torch.randn(y.shape, generator=g).to(device=y.device, dtype=y.dtype)
    grads = torch.autograd.grad(y, (x, a, b), grad_y)
    return (y.detach(), *grads)


def reference_with_keep(keep: torch.Tensor, dropout_p: float):
    """The reference with its dropout replaced by the given keep-mask on the LoRA input."""

    def reference(x, weight, bias, lora_a, lora_b, scaling, out_mask, in_mask, _dropout_p, _training):
        if in_mask is not None:
            x = x * in_mask.to(x.dtype)
        y = F.linear(x, weight, bias)
        lora_in = x * keep.view(x.shape).to(x.dtype) * (1.0 / (1.0 - dropout_p))
        y = y + scaling * F.linear(F.linear(lora_in, lora_a.to(x.dtype)), lora_b.to(x.dtype))
        if out_mask is not None:
            y = y * out_mask.to(y.dtype)
        return y

    return reference


SHAPES = {  # (leading shape of x, in, out, rank)
    "2d": ((37,), 96, 80, 5),
    "3d": ((2, 9), 70, 45, 19),
    "decode": ((2, 7), 70, 45, 19),  # 14 tokens: the fast paths take the one-launch decode kernel
}
# The kernels with every fast path off (the paths they replace) and with the default set; each must
# match the reference.
PATHS = {"old": frozenset(), "default": frozenset(DEFAULT_FAST_PATHS)}
# The GEMM fast paths alone, and all of them (tma takes precedence over lora_k_steps where it fits:
# on the aligned shapes; the odd ones take lora_k_steps with every other path): each must match
# the reference like the paths they accelerate.
GEMM_PATHS = {
    "lora_k_steps": frozenset({"lora_k_steps"}),
    "persistent": frozenset({"persistent"}),
    "tma": frozenset({"tma"}),
    "all": frozenset(FAST_PATHS),
}
ALL_PATHS = {**PATHS, **GEMM_PATHS}
# For the slower mask and dropout cases (aligned shapes, where "all" takes tma): lora_k_steps with
# every other path instead.
ALL_BUT_TMA = frozenset(FAST_PATHS) - {"tma"}
KEY_PATHS = {**PATHS, "lora_k_steps": GEMM_PATHS["lora_k_steps"], "all_but_tma": ALL_BUT_TMA}


def with_paths(paths: frozenset[str]):
    return functools.partial(kernel.masked_lora_linear, fast_paths=paths)


@pytest.mark.parametrize("paths", PATHS.values(), ids=PATHS.keys())
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_forward_and_gradients_match_reference(shape, mask_kind, with_bias, paths):
    lead, in_features, out_features, rank = shape
    layer = make_layer(lead, in_features, out_features, rank, bias=with_bias)
    out_mask, in_mask = make_masks(mask_kind, out_features, in_features)
    actual = run(with_paths(paths), layer, out_mask, in_mask)
    expected = run(masked_lora_linear_reference, layer, out_mask, in_mask)
    for got, want in zip(actual, expected, strict=True):
        assert_close(got, want, torch.float32)
    if mask_kind == "all_masked":
        assert not actual[0].any() and not actual[1].any() and not actual[2].any() and not actual[3].any()


# "aligned": every row stride a multiple of 16 bytes in float32, so tma can take it; "odd": it cannot.
GEMM_SHAPES = {"aligned": ((37,), 96, 80, 5), "odd": ((2, 9), 70, 45, 19)}


@pytest.mark.parametrize("paths", GEMM_PATHS.values(), ids=GEMM_PATHS.keys())
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("shape", GEMM_SHAPES.values(), ids=GEMM_SHAPES.keys())
def test_gemm_fast_paths_match_reference(shape, mask_kind, paths):
    lead, in_features, out_features, rank = shape
    layer = make_layer(lead, in_features, out_features, rank)
    out_mask, in_mask = make_masks(mask_kind, out_features, in_features)
    actual = run(with_paths(paths), layer, out_mask, in_mask)
    expected = run(masked_lora_linear_reference, layer, out_mask, in_mask)
    for got, want in zip(actual, expected, strict=True):
        assert_close(got, want, torch.float32)


def test_plan_lists_the_kept_features_and_k_tiles_first_in_order():
    for num_masked in (0, 1, 37, 79, 80):
        mask = scattered_mask(80, num_masked, seed=num_masked)
        plan = masked_lora_linear_plan(mask, mask)
        kept, masked = mask.nonzero().flatten(), (~mask).nonzero().flatten()
        assert plan.out_count.ndim == 0 and plan.out_count.device == mask.device
        assert plan.out_count.item() == 80 - num_masked
        assert torch.equal(plan.out_order, torch.cat([kept, masked]))
        offset = 0
        for index, width in enumerate(K_TILE_WIDTHS):  # the kernels find each list at this offset
            num_tiles = math.ceil(80 / width)
            tile_kept = torch.zeros(num_tiles, dtype=torch.bool, device=mask.device)
            tile_kept[kept // width] = True
            expected = torch.cat([tile_kept.nonzero().flatten(), (~tile_kept).nonzero().flatten()])
            assert plan.in_tile_counts[index].item() == tile_kept.sum().item()
            assert torch.equal(plan.in_tiles[offset : offset + num_tiles].long(), expected)
            offset += num_tiles
        assert offset == plan.in_tiles.numel()


SCATTERED_FRACTIONS = {"all_kept": 0.0, "one_masked": None, "half": 0.5, "most": 0.9, "all_masked": 1.0}
SCATTERED_CASES = {  # (leading shape of x, in, out, rank, bias, in-mask); out: 2.5 and 6.25 tiles of 32
    "2d_bias": ((37,), 96, 80, 5, True, False),
    "3d_in_mask": ((2, 9), 70, 200, 19, False, True),
}


@pytest.mark.parametrize("paths", KEY_PATHS.values(), ids=KEY_PATHS.keys())
@pytest.mark.parametrize("fraction", SCATTERED_FRACTIONS.values(), ids=SCATTERED_FRACTIONS.keys())
@pytest.mark.parametrize("case", SCATTERED_CASES.values(), ids=SCATTERED_CASES.keys())
def test_scattered_output_masks_match_reference(case, fraction, paths):
    """Kept-first tiles of every kind (fully kept, boundary, fully masked, partly out of range)."""
    lead, in_features, out_features, rank, with_bias, with_in_mask = case
    num_masked = 1 if fraction is None else round(fraction * out_features)
    layer = make_layer(lead, in_features, out_features, rank, bias=with_bias)
    out_mask = scattered_mask(out_features, num_masked)
    in_mask = make_masks("in_only", out_features, in_features)[1] if with_in_mask else None
    actual = run(with_paths(paths), layer, out_mask, in_mask)
    expected = run(masked_lora_linear_reference, layer, out_mask, in_mask)
    for got, want in zip(actual, expected, strict=True):
        assert_close(got, want, torch.float32)
    y, _, _, grad_b = actual
    assert not y[..., ~out_mask].any() and not grad_b[~out_mask].any()  # exact zeros


@pytest.mark.skipif(not triton_interpreter(), reason="observes the loads through the Triton interpreter")
def test_scattered_masked_features_are_never_loaded_nor_computed(monkeypatch):
    """With 90 % of the output features masked at scattered positions almost every 32-wide tile of
    consecutive features holds a kept one, so skipping masked tiles would read nearly every W row.
    The gathered kernels read exactly the kept rows of W (forward and dX) and of B (forward), and
    the forward's tile products shrink with the kept features."""
    from triton.runtime import interpreter

    lead, in_features, out_features, rank = (2, 9), 70, 200, 19
    layer = make_layer(lead, in_features, out_features, rank)
    out_mask = scattered_mask(out_features, 180)
    kept = set(out_mask.nonzero().flatten().tolist())
    builder = interpreter.InterpreterBuilder
    masked_load, dot = builder.create_masked_load, builder.create_dot
    loaded: list[np.ndarray] = []  # addresses of the elements loaded
    num_dots = [0]

    def spy_load(self, ptrs, mask, *args, **kwargs):
        loaded.append(ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)].astype(np.uint64))
        return masked_load(self, ptrs, mask, *args, **kwargs)

    def spy_dot(self, *args):
        num_dots[0] += 1
        return dot(self, *args)

    monkeypatch.setattr(builder, "create_masked_load", spy_load)
    monkeypatch.setattr(builder, "create_dot", spy_dot)

    def rows_loaded(t: torch.Tensor) -> set[int]:
        """The rows of the contiguous matrix ``t`` of which some element was loaded."""
        addresses = np.concatenate(loaded) if loaded else np.zeros(0, np.uint64)
        base, row_bytes = t.data_ptr(), t.stride(0) * t.element_size()
        inside = addresses[(addresses >= base) & (addresses < base + t.numel() * t.element_size())]
        return set(((inside - base) // row_bytes).tolist())

    def forward(out_mask):
        args = (layer["weight"], layer["bias"], layer["lora_a"], layer["lora_b"], layer["scaling"])
        return kernel.masked_lora_linear(layer["x"], *args, out_mask, None, 0.0, False)

    # lora_k_steps (where it is enabled) reads B through s·B, a padded copy in the compute dtype:
    # spy on it too.
    scaled_b: list[torch.Tensor] = []
    k_steps_factor = kernel._k_steps_factor

    def spy_k_steps_factor(*args):
        scaled_b.append(k_steps_factor(*args))
        return scaled_b[-1]

    monkeypatch.setattr(kernel, "_k_steps_factor", spy_k_steps_factor)
    y = forward(out_mask)
    dots_masked = num_dots[0]
    b_rows = rows_loaded(scaled_b[0].t()) if scaled_b else rows_loaded(layer["lora_b"])
    assert rows_loaded(layer["weight"]) == kept and b_rows == kept
    y.backward(torch.randn_like(y))
    assert rows_loaded(layer["weight"]) == kept  # dX reduces over the kept W rows only
    loaded.clear()
    num_dots[0] = 0
    forward(None)
    assert rows_loaded(layer["weight"]) == set(range(out_features))  # the spy does see every load
    assert 3 * dots_masked < num_dots[0]


@pytest.mark.parametrize("mask_kind", ["both_random", "absent"])
def test_ops_entry_point_dispatches_to_triton(mask_kind):
    layer = make_layer((3, 5), 48, 40, 6)
    out_mask, in_mask = make_masks(mask_kind, 40, 48)

    def through_ops(x, weight, bias, lora_a, lora_b, scaling, out_mask, in_mask, dropout_p, training):
        return ops.masked_lora_linear(
            x,
            weight,
            bias,
            lora_a,
            lora_b,
            scaling,
            out_mask,
            in_mask,
            dropout_p=dropout_p,
            training=training,
            backend="triton",
        )

    actual = run(through_ops, layer, out_mask, in_mask)
    for got, want in zip(actual, run(kernel.masked_lora_linear, layer, out_mask, in_mask), strict=True):
        assert torch.equal(got, want)  # the same kernels ran
    for got, want in zip(actual, run(masked_lora_linear_reference, layer, out_mask, in_mask), strict=True):
        assert_close(got, want, torch.float32)


def test_rank_above_one_rank_block():
    """Ranks over 64 are split into several rank blocks (the rank grid / loop)."""
    layer = make_layer((21,), 40, 50, 70)
    out_mask, in_mask = make_masks("both_random", 50, 40)
    actual = run(kernel.masked_lora_linear, layer, out_mask, in_mask)
    for got, want in zip(actual, run(masked_lora_linear_reference, layer, out_mask, in_mask), strict=True):
        assert_close(got, want, torch.float32)


@pytest.mark.parametrize("paths", KEY_PATHS.values(), ids=KEY_PATHS.keys())
@pytest.mark.parametrize("mask_kind", ["both_random", "head_blocks"])
@pytest.mark.parametrize("lead", [(3, 11), (2, 5)], ids=["33_tokens", "10_tokens"])
def test_dropout_matches_reference_with_the_same_keep_mask(lead, mask_kind, paths):
    in_features, out_features, rank = 64, 72, 7
    dropout_p = 0.3
    layer = make_layer(lead, in_features, out_features, rank)
    out_mask, in_mask = make_masks(mask_kind, out_features, in_features)
    torch.manual_seed(1234)
    actual = run(with_paths(paths), layer, out_mask, in_mask, dropout_p, training=True)
    torch.manual_seed(1234)  # the kernel's seed comes from the default generator: draw it again
    seed = kernel.draw_dropout_seed(DEVICE)
    bits = "dropout_bits" in paths
    keep = kernel.dropout_keep_mask(seed, math.prod(lead), in_features, dropout_p, dropout_bits=bits)
    expected = run(reference_with_keep(keep, dropout_p), layer, out_mask, in_mask)
    for got, want in zip(actual, expected, strict=True):
        assert_close(got, want, torch.float32)
    without_dropout = run(masked_lora_linear_reference, layer, out_mask, in_mask)
    assert not torch.allclose(actual[0], without_dropout[0], atol=1e-3)  # dropout did act


@pytest.mark.parametrize("dropout_bits", [False, True], ids=["old", "dropout_bits"])
def test_dropout_keep_mask_is_seeded_and_has_the_right_rate(dropout_bits):
    dropout_p = 0.25
    seed = torch.tensor([987654321], dtype=torch.int64, device=DEVICE)
    draw = functools.partial(kernel.dropout_keep_mask, dropout_bits=dropout_bits)
    keep = draw(seed, 256, 160, dropout_p)
    assert keep.shape == (256, 160) and keep.dtype == torch.bool
    assert abs(keep.float().mean().item() - (1 - dropout_p)) < 0.01  # 40960 draws: sd ~0.002
    assert torch.equal(keep, draw(seed.clone(), 256, 160, dropout_p))
    assert not torch.equal(keep, draw(seed + 1, 256, 160, dropout_p))
    # Rows and columns are both counters: no row repeats another's pattern.
    assert not torch.equal(keep[0], keep[1]) and not torch.equal(keep[:, 0], keep[:, 1])
    # Each of the four outputs of a philox call keeps at the same rate (a column's index mod 4).
    for lane in range(4):
        assert abs(keep[:, lane::4].float().mean().item() - (1 - dropout_p)) < 0.02
    assert not torch.equal(keep[:, 0::4], keep[:, 1::4])


def test_dropout_reproducible_under_manual_seed_and_off_when_not_training():
    layer = make_layer((9,), 32, 24, 4)
    outs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        outs.append(run(kernel.masked_lora_linear, layer, None, None, 0.5, training=True)[0])
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    evaluation = run(kernel.masked_lora_linear, layer, None, None, 0.5, training=False)
    for got, want in zip(evaluation, run(masked_lora_linear_reference, layer, None, None), strict=True):
        assert_close(got, want, torch.float32)


@pytest.mark.parametrize("paths", KEY_PATHS.values(), ids=KEY_PATHS.keys())
@pytest.mark.parametrize("mask_kind", ["head_blocks", "scattered"])
@pytest.mark.parametrize(
    "dtype",
    [torch.float32, pytest.param(torch.bfloat16, marks=requires_cuda)],
    ids=["float32", "bfloat16"],
)
def test_every_output_element_is_written(monkeypatch, dtype, mask_kind, paths):
    """Buffers the launchers allocate come back NaN-poisoned: a missed element would show, and so
    would a read of the compact D's unwritten part."""
    lead, in_features, out_features, rank = (29,), 72, 66, 6
    dropout_p = 0.2
    layer = make_layer(lead, in_features, out_features, rank, dtype=dtype)
    out_mask, in_mask = make_masks("head_blocks", out_features, in_features)
    if mask_kind == "scattered":
        out_mask = scattered_mask(out_features, 33)
    torch.manual_seed(7)
    seed = kernel.draw_dropout_seed(DEVICE)
    bits = "dropout_bits" in paths
    keep = kernel.dropout_keep_mask(seed, math.prod(lead), in_features, dropout_p, dropout_bits=bits)
    expected = run(reference_with_keep(keep, dropout_p), layer, out_mask, in_mask)

    def poisoned(allocate):
        def allocate_poisoned(*args, **kwargs):
            t = allocate(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t

        return allocate_poisoned

    monkeypatch.setattr(torch, "empty", poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(torch.empty_like))
    torch.manual_seed(7)
    actual = run(with_paths(paths), layer, out_mask, in_mask, dropout_p, training=True)
    monkeypatch.undo()
    for got, want in zip(actual, expected, strict=True):
        assert_close(got, want, dtype)  # includes isfinite
    assert not actual[0][:, ~out_mask].any() and not actual[3][~out_mask].any()


@pytest.mark.parametrize("paths", KEY_PATHS.values(), ids=KEY_PATHS.keys())
@pytest.mark.parametrize("tokens", [17, 5], ids=["prefill", "decode"])
def test_non_contiguous_inputs(tokens, paths):
    in_features, out_features, rank = 40, 36, 5
    layer = make_layer((tokens,), in_features, out_features, rank)
    out_mask, in_mask = make_masks("both_random", out_features, in_features)
    expected = run(masked_lora_linear_reference, layer, out_mask, in_mask)
    strided = dict(layer)
    # x as a transposed view (features not unit-stride), W, A and B as transposed views.
    strided["x"] = layer["x"].detach().t().contiguous().t().requires_grad_()
    strided["weight"] = layer["weight"].t().contiguous().t()
    strided["lora_a"] = layer["lora_a"].detach().t().contiguous().t().requires_grad_()
    strided["lora_b"] = layer["lora_b"].detach().t().contiguous().t().requires_grad_()
    assert not strided["x"].is_contiguous() and not strided["weight"].is_contiguous()
    actual = run(with_paths(paths), strided, out_mask, in_mask)
    for got, want in zip(actual, expected, strict=True):
        assert_close(got, want, torch.float32)


def test_only_requested_gradients_are_computed():
    layer = make_layer((13,), 32, 40, 3)
    layer["x"].requires_grad_(False)  # e.g. the first layer: embeddings are frozen
    out_mask, in_mask = make_masks("both_random", 40, 32)
    y = kernel.masked_lora_linear(
        layer["x"],
        layer["weight"],
        layer["bias"],
        layer["lora_a"],
        layer["lora_b"],
        layer["scaling"],
        out_mask,
        in_mask,
        0.0,
        False,
    )
    grad_y = torch.randn_like(y)
    grad_a, grad_b = torch.autograd.grad(y, (layer["lora_a"], layer["lora_b"]), grad_y)
    y_ref = masked_lora_linear_reference(
        layer["x"],
        layer["weight"],
        layer["bias"],
        layer["lora_a"],
        layer["lora_b"],
        layer["scaling"],
        out_mask,
        in_mask,
    )
    for got, want in zip(
        (grad_a, grad_b), torch.autograd.grad(y_ref, (layer["lora_a"], layer["lora_b"]), grad_y), strict=True
    ):
        assert_close(got, want, torch.float32)


def strided_masks(out_features: int, in_features: int) -> dict[str, tuple]:
    """Masks that are not contiguous, by kind: every other element of a longer mask, and masks
    expanded from one element (stride 0), all kept and all masked."""
    g = torch.Generator().manual_seed(5)
    out_long = (torch.rand(2 * out_features, generator=g) < 0.5).to(DEVICE)
    in_long = (torch.rand(2 * in_features, generator=g) < 0.5).to(DEVICE)

    def expanded(value: bool, n: int) -> torch.Tensor:
        return torch.tensor([value], device=DEVICE).expand(n)

    return {
        "every_other": (out_long[::2], in_long[::2]),
        "expanded_kept": (expanded(True, out_features), expanded(True, in_features)),
        "expanded_masked": (expanded(False, out_features), expanded(False, in_features)),
        "mixed": (out_long[::2], expanded(True, in_features)),
    }


@pytest.mark.parametrize("kind", ["every_other", "expanded_kept", "expanded_masked", "mixed"])
@pytest.mark.parametrize("entry", ["kernel", "ops_triton", "ops_torch"])
def test_non_contiguous_masks_act_as_their_contiguous_copies(entry, kind):
    """Bug: bool masks were read as contiguous bytes, so ``m[::2]`` read the wrong features (an
    error of 1.8 against the same mask made contiguous) and an expanded mask read out of bounds."""
    lead, in_features, out_features, rank = (11,), 40, 36, 5
    layer = make_layer(lead, in_features, out_features, rank)
    out_mask, in_mask = strided_masks(out_features, in_features)[kind]
    assert not out_mask.is_contiguous() and out_mask.shape == (out_features,)

    def through(backend):
        def call(x, weight, bias, lora_a, lora_b, scaling, out_mask, in_mask, dropout_p, training):
            args = (x, weight, bias, lora_a, lora_b, scaling, out_mask, in_mask)
            return ops.masked_lora_linear(*args, dropout_p=dropout_p, training=training, backend=backend)

        return call

    fn = {"kernel": kernel.masked_lora_linear, "ops_triton": through("triton"), "ops_torch": through("torch")}
    actual = run(fn[entry], layer, out_mask, in_mask)
    expected = run(masked_lora_linear_reference, layer, out_mask.contiguous(), in_mask.contiguous())
    for got, want in zip(actual, expected, strict=True):
        assert_close(got, want, torch.float32)


GRAD_SUBSETS = {  # which of x, lora_a, lora_b require grad
    "x": (True, False, False),
    "a": (False, True, False),
    "b": (False, False, True),
    "x_a": (True, True, False),
    "x_b": (True, False, True),
    "a_b": (False, True, True),
}


@pytest.mark.parametrize("paths", ALL_PATHS.values(), ids=ALL_PATHS.keys())
@pytest.mark.parametrize("needs", GRAD_SUBSETS.values(), ids=GRAD_SUBSETS.keys())
def test_backward_with_any_subset_of_inputs_requiring_grad(needs, paths):
    """Bug: with exactly one of x, A, B requiring grad the custom op returned one empty placeholder
    as two of its outputs, and torch's aliasing check raised (e.g. A and B frozen and only x
    requiring grad: input-gradient analysis, or a frozen adapter)."""
    layer = make_layer((13,), 32, 40, 3)
    names = ("x", "lora_a", "lora_b")
    for name, needed in zip(names, needs, strict=True):
        layer[name].requires_grad_(needed)
    wanted = tuple(layer[name] for name, needed in zip(names, needs, strict=True) if needed)
    out_mask, in_mask = make_masks("both_random", 40, 32)
    args = (
        layer["weight"],
        layer["bias"],
        layer["lora_a"],
        layer["lora_b"],
        layer["scaling"],
        out_mask,
        in_mask,
    )
    y = with_paths(paths)(layer["x"], *args, 0.0, False)
    grad_y = torch.randn_like(y)
    actual = torch.autograd.grad(y, wanted, grad_y)
    expected = torch.autograd.grad(masked_lora_linear_reference(layer["x"], *args), wanted, grad_y)
    for got, want in zip(actual, expected, strict=True):
        assert_close(got, want, torch.float32)


def autotune_keys_spy(monkeypatch) -> dict[str, list[tuple]]:
    """Record, per autotuned kernel, the key each launch is tuned under: its ``key`` arguments as
    (name, value) pairs."""
    from triton.runtime.autotuner import Autotuner

    keys: dict[str, list[tuple]] = {}
    autotuned_run = Autotuner.run

    def spy(self, *args, **kwargs):
        named = {**dict(zip(self.arg_names, args, strict=False)), **kwargs}
        keys.setdefault(self.fn.__name__, []).append(tuple((k, named[k]) for k in self.keys))
        return autotuned_run(self, *args, **kwargs)

    monkeypatch.setattr(Autotuner, "run", spy)
    return keys


@pytest.mark.parametrize("dropout_p", [0.0, 0.2], ids=["plain", "dropout"])
def test_each_gemm_of_a_square_layer_is_tuned_under_its_own_key(monkeypatch, dropout_p):
    """Bug: the autotune keys left out the flags that change the best config, so the forward GEMM
    and dX of a square layer shared one tuned config (and dA and dB, and H and G)."""
    keys = autotune_keys_spy(monkeypatch)
    layer = make_layer((20,), 48, 48, 4)
    run(kernel.masked_lora_linear, layer, None, None, dropout_p, training=dropout_p > 0)
    launched = {name: len(k) for name, k in keys.items()}
    distinct = {name: len(set(k)) for name, k in keys.items()}
    assert distinct == launched, f"launches {launched} share keys: {keys}"


def test_no_kernel_is_launched_or_tuned_for_zero_tokens(monkeypatch):
    """Bug: a first call with M = 0 tuned on an empty grid and kept that config for M <= 16."""
    keys = autotune_keys_spy(monkeypatch)
    layer = make_layer((0,), 32, 24, 4)
    out_mask, in_mask = make_masks("both_random", 24, 32)
    actual = run(kernel.masked_lora_linear, layer, out_mask, in_mask, 0.1, training=True)
    assert not keys
    expected = run(masked_lora_linear_reference, layer, out_mask, in_mask)
    for got, want in zip(actual, expected, strict=True):
        assert got.shape == want.shape and not got.any()


@pytest.mark.parametrize("entry", ["kernel", "ops_triton"])
def test_a_bias_that_requires_grad_is_rejected(entry):
    """The kernels compute no bias gradient: a trainable bias was silently given none."""
    layer = make_layer((5,), 32, 24, 4)
    layer["bias"].requires_grad_()
    args = [layer[k] for k in ("x", "weight", "bias", "lora_a", "lora_b", "scaling")]
    with pytest.raises((ValueError, ops.BackendUnavailableError), match="bias"):
        if entry == "kernel":
            kernel.masked_lora_linear(*args, None, None, 0.0, False)
        else:
            ops.masked_lora_linear(*args, backend="triton")
    # the automatic choice falls through to the reference, which does compute it
    y = ops.masked_lora_linear(*args)
    (grad_bias,) = torch.autograd.grad(y.sum(), layer["bias"])
    assert torch.equal(grad_bias, torch.full_like(grad_bias, 5.0))
    with torch.no_grad():  # nothing to differentiate: the kernels may run
        kernel.masked_lora_linear(*args, None, None, 0.0, False)


def launched_flags(keys: dict[str, list[tuple]]) -> list[dict]:
    """Every launch the spy saw, as a dict of its key arguments plus the kernel's name."""
    return [{"kernel": name, **dict(key)} for name, launches in keys.items() for key in launches]


def test_dropout_bits_are_drawn_once_and_read_by_the_backward(monkeypatch):
    """The dropout_bits path draws the keep-mask in the forward's down-projection only, and dA and
    dX read the stored bits; the old path regenerates it in all three."""
    layer = make_layer((3, 11), 64, 72, 7)
    out_mask, in_mask = make_masks("both_random", 72, 64)
    for paths, reads_bits in ((PATHS["default"], True), (PATHS["old"], False)):
        keys = autotune_keys_spy(monkeypatch)
        run(with_paths(paths), layer, out_mask, in_mask, 0.3, training=True)
        monkeypatch.undo()
        by_kind = {flags["KIND"]: flags for flags in launched_flags(keys)}
        assert by_kind["h"]["LORA_DROPOUT"] and by_kind["h"]["STORE_BITS"] == reads_bits
        for kind in ("da", "dx"):
            assert by_kind[kind]["LORA_DROPOUT"] and by_kind[kind]["KEEP_BITS"] == reads_bits


@pytest.mark.parametrize("paths", PATHS.values(), ids=PATHS.keys())
def test_dropout_zero_does_no_random_work(monkeypatch, paths):
    """Training with dropout 0 draws no seed and compiles every kernel without dropout."""

    def no_seed(device):
        raise AssertionError("a dropout seed was drawn for dropout 0")

    monkeypatch.setattr(kernel, "draw_dropout_seed", no_seed)
    keys = autotune_keys_spy(monkeypatch)
    layer = make_layer((3, 11), 64, 72, 7)
    out_mask, in_mask = make_masks("both_random", 72, 64)
    actual = run(with_paths(paths), layer, out_mask, in_mask, 0.0, training=True)
    assert not any(flags.get("LORA_DROPOUT") or flags.get("STORE_BITS") for flags in launched_flags(keys))
    for got, want in zip(actual, run(masked_lora_linear_reference, layer, out_mask, in_mask), strict=True):
        assert_close(got, want, torch.float32)


@pytest.mark.parametrize("num_tokens", [1, 16, 17])
def test_decode_is_one_launch_for_up_to_16_tokens(monkeypatch, num_tokens):
    keys = autotune_keys_spy(monkeypatch)
    layer = make_layer((num_tokens,), 70, 45, 6)
    out_mask, in_mask = make_masks("both_random", 45, 70)
    with torch.no_grad():
        y = with_paths(PATHS["default"])(
            layer["x"], *[layer[k] for k in list(layer)[1:]], out_mask, in_mask, 0.0, False
        )
    launched = [flags["kernel"] for flags in launched_flags(keys)]
    assert launched == (
        ["_decode_kernel"] if num_tokens <= 16 else ["_lora_down_kernel", "_masked_lora_gemm_kernel"]
    )
    expected = masked_lora_linear_reference(
        layer["x"], *[layer[k] for k in list(layer)[1:]], out_mask, in_mask
    )
    assert_close(y, expected.detach(), torch.float32)


# K-heavy decode layers, (leading shape of x, in, out, rank), named by the K splits the interpreter
# gives them (decode_splits; a GPU splits them too): odd sizes, 14, 1 and 16 tokens, rank 19.
SPLIT_K_SHAPES = {
    "3_splits": ((2, 7), 1000, 45, 19),
    "2_splits": ((1,), 600, 70, 5),
    "16_tokens": ((16,), 777, 33, 8),
}


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("shape", SPLIT_K_SHAPES.values(), ids=SPLIT_K_SHAPES.keys())
def test_decode_split_k_matches_reference(monkeypatch, shape, mask_kind, with_bias):
    """The split-K decode alone (and with every path: it takes precedence over decode) against the
    reference, forward and every gradient; it launches the split and reduce kernels only."""
    lead, in_features, out_features, rank = shape
    assert kernel.decode_splits(out_features, in_features, DEVICE) > 1  # on a GPU too
    layer = make_layer(lead, in_features, out_features, rank, bias=with_bias)
    out_mask, in_mask = make_masks(mask_kind, out_features, in_features)
    expected = run(masked_lora_linear_reference, layer, out_mask, in_mask)
    for paths in (frozenset({"decode_split_k"}), GEMM_PATHS["all"]):
        keys = autotune_keys_spy(monkeypatch)
        with torch.no_grad():
            with_paths(paths)(layer["x"], *[layer[k] for k in list(layer)[1:]], out_mask, in_mask, 0.0, False)
        monkeypatch.undo()
        assert [flags["kernel"] for flags in launched_flags(keys)] == ["_decode_split_kernel"]
        actual = run(with_paths(paths), layer, out_mask, in_mask)
        for got, want in zip(actual, expected, strict=True):
            assert_close(got, want, torch.float32)
        if mask_kind == "all_masked":
            assert not actual[0].any() and not actual[1].any()


@pytest.mark.parametrize("splits", [1, 2, 5, 16])
@pytest.mark.parametrize("mask_kind", ["absent", "both_random"])
def test_decode_split_k_any_split_count(splits, mask_kind):
    """Y and H for any split count, trailing empty K ranges included (300 features in 256-wide
    granules: the splits after the second are empty): their partials must be zeros, not garbage;
    H's columns past the rank (it is stored 16 wide) too."""
    layer = make_layer((5,), 300, 45, 6)
    out_mask, in_mask = make_masks(mask_kind, 45, 300)
    args = [layer[k].detach() for k in ("x", "weight", "bias", "lora_a", "lora_b")]
    out_axis = kernel._out_axis(out_mask, *masked_lora_linear_plan(out_mask, None)[2:4])
    y, hidden = kernel._decode_split_k(*args, layer["scaling"], in_mask, out_axis, splits)
    x, weight, bias, lora_a, lora_b = args
    expected = masked_lora_linear_reference(
        x, weight, bias, lora_a, lora_b, layer["scaling"], out_mask, in_mask
    )
    assert_close(y, expected, torch.float32)
    x_in = x if in_mask is None else x * in_mask
    assert hidden.shape == (5, 16) and not hidden[:, 6:].any()
    assert_close(hidden[:, :6], x_in @ lora_a.t(), torch.float32)


def test_decode_splits_only_where_k_is_long_and_output_tiles_few():
    programs = kernel._decode_split_programs(DEVICE)
    assert kernel.decode_splits(0, 4096, DEVICE) == 1  # no output features: nothing to split
    assert kernel.decode_splits(45, 511, DEVICE) == 1  # a second split would get under 256 features
    assert kernel.decode_splits(45, 1000, DEVICE) == 3  # 2 column tiles: as many splits as K allows
    assert kernel.decode_splits(32 * programs, 1 << 20, DEVICE) == 1  # the columns fill the device
    assert kernel.decode_splits(32, 1 << 20, DEVICE) == min(programs, kernel.DECODE_MAX_SPLITS)


def test_decode_split_k_passes_opcheck():
    layer = make_layer((7,), 600, 40, 5)
    out_mask, in_mask = make_masks("both_random", 40, 600)
    plan = masked_lora_linear_plan(out_mask, in_mask)
    args = (
        layer["x"], layer["weight"], layer["bias"], layer["lora_a"], layer["lora_b"], layer["scaling"],
        out_mask, in_mask, 0.0, None, *plan[2:],
    )  # fmt: skip
    kwargs = {"decode_split_k": True}
    assert kernel.decode_splits(40, 600, DEVICE) > 1
    torch.library.opcheck(torch.ops.loraprune.masked_lora_linear.default, args, kwargs)


@requires_cuda
@pytest.mark.parametrize("in_out", [(11008, 4096), (4096, 4096)], ids=["down", "o"])
def test_decode_split_k_is_deterministic_and_replays_in_a_cuda_graph(in_out):
    """LLaMA-7B down_proj and o_proj at one token, bfloat16: the split-K decode runs (its split
    count > 1 on any GPU with fewer than 384 SMs), gives bit-identical outputs on every call, and
    replays in a CUDA graph on new inputs (no host sync, one workspace shape)."""
    in_features, out_features = in_out
    assert kernel.decode_splits(out_features, in_features, DEVICE) > 1
    layer = make_layer((1,), in_features, out_features, 8, dtype=torch.bfloat16)
    in_mask = scattered_mask(in_features, in_features // 2)
    paths = frozenset({"decode_split_k"})
    with torch.no_grad():
        args = [layer[k].detach() for k in ("x", "weight", "bias", "lora_a", "lora_b")]
        forward = functools.partial(
            kernel.masked_lora_linear, scaling=layer["scaling"], out_mask=None, in_mask=in_mask,
            dropout_p=0.0, training=False, fast_paths=paths,
        )  # fmt: skip
        first = forward(*args)
        assert torch.equal(first, forward(*args))
        static_x = args[0].clone()
        forward(static_x, *args[1:])  # tuned and compiled before the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = forward(static_x, *args[1:])
        static_x.copy_(torch.randn_like(static_x))
        graph.replay()
        expected = forward(static_x, *args[1:])
    assert torch.equal(static_y, expected)
    exact = masked_lora_linear_reference(
        *(t.double() for t in (static_x, *args[1:])), layer["scaling"], None, in_mask
    )
    assert_close(static_y, exact.to(static_y.dtype), torch.bfloat16)


@pytest.mark.skipif(not triton_interpreter(), reason="observes the loads through the Triton interpreter")
def test_k_tiles_skip_the_masked_tiles_of_an_input_masked_forward(monkeypatch):
    """Pruned heads of o_proj: with k_tiles the forward's K loops (H and the GEMM) never load X or W
    in a K tile whose input features are all masked; without it they load every tile."""
    from triton.runtime import interpreter

    lead, in_features, out_features, rank = (19,), 160, 40, 5
    layer = make_layer(lead, in_features, out_features, rank)
    in_mask = torch.ones(in_features, dtype=torch.bool, device=DEVICE)
    in_mask[32:96] = False  # two whole 32-wide tiles (the interpreter's BLOCK_Q)
    in_mask[100] = False  # and one feature of a tile that stays
    builder = interpreter.InterpreterBuilder
    masked_load = builder.create_masked_load
    loaded: list[np.ndarray] = []

    def spy_load(self, ptrs, mask, *args, **kwargs):
        loaded.append(ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)].astype(np.uint64))
        return masked_load(self, ptrs, mask, *args, **kwargs)

    monkeypatch.setattr(builder, "create_masked_load", spy_load)

    def columns_loaded(t: torch.Tensor) -> set[int]:
        addresses = np.concatenate(loaded)
        base, size = t.data_ptr(), t.numel() * t.element_size()
        inside = addresses[(addresses >= base) & (addresses < base + size)]
        return set(((inside - base) // t.element_size() % t.shape[1]).tolist())

    args = [layer[k] for k in ("weight", "bias", "lora_a", "lora_b", "scaling")]
    expected = masked_lora_linear_reference(layer["x"], *args, None, in_mask)
    for paths, skipped in ((PATHS["default"], set(range(32, 96))), (PATHS["old"], set())):
        loaded.clear()
        with torch.no_grad():
            y = with_paths(paths)(layer["x"], *args, None, in_mask, 0.0, False)
        assert_close(y, expected.detach(), torch.float32)
        for t in (layer["x"], layer["weight"], layer["lora_a"]):
            assert columns_loaded(t) == set(range(in_features)) - skipped


def test_empty_input():
    layer = make_layer((0,), 32, 24, 4)
    y = kernel.masked_lora_linear(
        layer["x"],
        layer["weight"],
        layer["bias"],
        layer["lora_a"],
        layer["lora_b"],
        layer["scaling"],
        None,
        None,
        0.0,
        False,
    )
    assert y.shape == (0, 24)


@pytest.mark.parametrize("tokens", [19, 7], ids=["prefill", "decode"])
@pytest.mark.parametrize("paths", [*PATHS.values(), ALL_BUT_TMA], ids=[*PATHS, "all_but_tma"])
@pytest.mark.parametrize("with_dropout", [False, True], ids=["plain", "dropout"])
def test_custom_op_passes_opcheck(with_dropout, paths, tokens):
    layer = make_layer((tokens,), 48, 40, 5)
    out_mask, in_mask = make_masks("both_random", 40, 48)
    seed = kernel.draw_dropout_seed(DEVICE) if with_dropout else None
    plan = masked_lora_linear_plan(out_mask, in_mask, k_tiles="k_tiles" in paths)
    args = (
        layer["x"],
        layer["weight"],
        layer["bias"],
        layer["lora_a"],
        layer["lora_b"],
        layer["scaling"],
        out_mask,
        in_mask,
        0.2 if with_dropout else 0.0,
        seed,
        *plan[2:],
        "dropout_bits" in paths,
        "decode" in paths,
        "lora_k_steps" in paths,
        "persistent" in paths,
        "tma" in paths,
    )
    torch.library.opcheck(torch.ops.loraprune.masked_lora_linear.default, args)


@pytest.mark.parametrize("paths", PATHS.values(), ids=PATHS.keys())
def test_traces_under_torch_compile(paths):
    layer = make_layer((2, 7), 48, 40, 5)
    out_mask, in_mask = make_masks("both_random", 40, 48)
    compiled = torch.compile(with_paths(paths), backend="aot_eager", fullgraph=True)
    actual = run(compiled, layer, out_mask, in_mask)
    for got, want in zip(actual, run(with_paths(paths), layer, out_mask, in_mask), strict=True):
        assert_close(got, want, torch.float32)


def gemm_launches(monkeypatch) -> list[dict]:
    """Every launch of the masked GEMM kernel: its autotune key arguments (KIND, LORA_K_STEPS,
    PERSISTENT, TMA, ...) and ``programs``, its grid at the interpreter's one config."""
    from triton.runtime.autotuner import Autotuner

    launches: list[dict] = []
    autotuned_run = Autotuner.run

    def spy(self, *args, **kwargs):
        if self.fn.__name__ == "_masked_lora_gemm_kernel":
            named = {**dict(zip(self.arg_names, args, strict=False)), **kwargs}
            (config,) = self.configs
            launches.append(
                {**{k: named[k] for k in self.keys}, "programs": kwargs["grid"](config.kwargs)[0]}
            )
        return autotuned_run(self, *args, **kwargs)

    monkeypatch.setattr(Autotuner, "run", spy)
    return launches


@pytest.mark.skipif(not triton_interpreter(), reason="the interpreter's single config sizes the grid")
@pytest.mark.parametrize("dropout_p", [0.0, 0.2], ids=["plain", "dropout"])
def test_gemm_fast_paths_are_taken_where_they_apply(monkeypatch, dropout_p):
    """lora_k_steps in the forward and in dX (not in dX with dropout: it acts on the LoRA term
    alone); persistent: fewer programs than tiles; tma only where the operands are 16-byte aligned
    and the target's compute capability is >= 9.0, and then in place of lora_k_steps."""
    from triton.runtime import interpreter

    descriptor_loads = [0]
    load = interpreter.InterpreterBuilder.create_descriptor_load

    def counting_load(self, *args):
        descriptor_loads[0] += 1
        return load(self, *args)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_descriptor_load", counting_load)
    launches = gemm_launches(monkeypatch)
    training = dropout_p > 0

    def taken(paths, shape=GEMM_SHAPES["aligned"], mask_kind="both_random") -> dict[str, dict]:
        lead, in_features, out_features, rank = shape
        launches.clear()
        descriptor_loads[0] = 0
        layer = make_layer(lead, in_features, out_features, rank)
        out_mask, in_mask = make_masks(mask_kind, out_features, in_features)
        run(with_paths(paths), layer, out_mask, in_mask, dropout_p, training)
        return {launch["KIND"]: launch for launch in launches}

    k_steps = taken(GEMM_PATHS["lora_k_steps"])
    assert k_steps["forward"]["LORA_K_STEPS"] and k_steps["dx"]["LORA_K_STEPS"] != training
    assert not any(launch["TMA"] or launch["PERSISTENT"] for launch in k_steps.values())
    old = taken(PATHS["old"], mask_kind="absent")  # 37 x 80 and 37 x 96 outputs: 6 and 6 tiles of 32
    persistent = taken(GEMM_PATHS["persistent"], mask_kind="absent")
    for kind in ("forward", "dx"):
        assert old[kind]["programs"] == 6 and not old[kind]["PERSISTENT"]
        assert persistent[kind]["programs"] == 3 and persistent[kind]["PERSISTENT"]
    tma = taken(GEMM_PATHS["tma"])
    assert tma["forward"]["TMA"] and tma["dx"]["TMA"] and descriptor_loads[0] > 0
    both = taken(GEMM_PATHS["tma"] | GEMM_PATHS["lora_k_steps"])
    assert both["forward"]["TMA"] and not both["forward"]["LORA_K_STEPS"]
    odd = taken(GEMM_PATHS["tma"], shape=GEMM_SHAPES["odd"])  # rows of 70 and 45 floats
    assert not odd["forward"]["TMA"] and not odd["dx"]["TMA"] and descriptor_loads[0] == 0
    monkeypatch.setattr(kernel, "target_major", lambda device: 8)  # an sm_80 target
    ampere = taken(GEMM_PATHS["tma"] | GEMM_PATHS["lora_k_steps"])
    assert not ampere["forward"]["TMA"] and ampere["forward"]["LORA_K_STEPS"] and descriptor_loads[0] == 0


# --- GPU: half precision at LLaMA-7B shapes ----------------------------------------------------


def exact_reference(layer: dict, out_mask, in_mask, grad_seed: int = 2):
    """The reference in float64 from the same (low-precision) inputs: the ground truth."""
    exact = {
        k: (v.detach().double().requires_grad_(v.requires_grad) if torch.is_tensor(v) else v)
        for k, v in layer.items()
    }
    return run(masked_lora_linear_reference, exact, out_mask, in_mask, grad_seed=grad_seed)


@requires_cuda
@pytest.mark.parametrize("rank", [8, 16, 64])
@pytest.mark.parametrize("in_out", [(4096, 11008), (11008, 4096), (4096, 4096)], ids=["up", "down", "q"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_llama_shapes_half_precision(dtype, in_out, rank):
    """The fused kernel (one rounding at the end) is at least as close to the exact result as the
    reference run in the same dtype (several roundings), up to the tolerance."""
    in_features, out_features = in_out
    layer = make_layer((2, 300), in_features, out_features, rank, dtype=dtype)
    out_mask, in_mask = make_masks("head_blocks", out_features, in_features)
    exact = exact_reference(layer, out_mask, in_mask)
    actual = run(kernel.masked_lora_linear, layer, out_mask, in_mask)
    for got, want in zip(actual, exact, strict=True):
        assert_close(got, want.to(got.dtype), dtype)


@requires_cuda
@pytest.mark.parametrize("paths", PATHS.values(), ids=PATHS.keys())
@pytest.mark.parametrize("rank", [8, 64])
@pytest.mark.parametrize("projection", ["gate_up", "down"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_llama_mlp_shapes_scattered_masks_half_precision(dtype, projection, rank, paths):
    """Half the MLP channels pruned at scattered positions: the rows of gate/up (gathered output
    features), the columns of down (input mask)."""
    hidden, intermediate = 4096, 11008
    if projection == "gate_up":
        in_features, out_features = hidden, intermediate
        out_mask, in_mask = scattered_mask(intermediate, intermediate // 2), None
    else:
        in_features, out_features = intermediate, hidden
        out_mask, in_mask = None, scattered_mask(intermediate, intermediate // 2)
    layer = make_layer((2, 300), in_features, out_features, rank, dtype=dtype)
    exact = exact_reference(layer, out_mask, in_mask)
    actual = run(with_paths(paths), layer, out_mask, in_mask)
    for got, want in zip(actual, exact, strict=True):
        assert_close(got, want.to(got.dtype), dtype)
    if out_mask is not None:
        assert not actual[0][..., ~out_mask].any() and not actual[3][~out_mask].any()


@requires_cuda
@pytest.mark.parametrize("paths", PATHS.values(), ids=PATHS.keys())
@pytest.mark.parametrize("rank", [8, 64])
@pytest.mark.parametrize("tokens", [1, 16])
@pytest.mark.parametrize("projection", ["gate_up", "down"])
def test_llama_decode_shapes_bfloat16(projection, tokens, rank, paths):
    """Decode sizes: the fast paths take the one-launch decode kernel, the old ones the GEMM."""
    in_features, out_features = (4096, 11008) if projection == "gate_up" else (11008, 4096)
    layer = make_layer((tokens,), in_features, out_features, rank, dtype=torch.bfloat16)
    out_mask = scattered_mask(out_features, out_features // 2) if projection == "gate_up" else None
    in_mask = scattered_mask(in_features, in_features // 2) if projection == "down" else None
    exact = exact_reference(layer, out_mask, in_mask)
    actual = run(with_paths(paths), layer, out_mask, in_mask)
    for got, want in zip(actual, exact, strict=True):
        assert_close(got, want.to(got.dtype), torch.bfloat16)


@requires_cuda
def test_autocast_casts_to_the_autocast_dtype():
    layer = make_layer((64,), 512, 384, 16, dtype=torch.float32)
    layer["weight"] = layer["weight"].to(torch.bfloat16)
    out_mask, in_mask = make_masks("both_random", 384, 512)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        actual = run(kernel.masked_lora_linear, layer, out_mask, in_mask)
        expected = run(masked_lora_linear_reference, layer, out_mask, in_mask)
    assert actual[0].dtype == torch.bfloat16 and actual[1].dtype == torch.float32
    for got, want in zip(actual, expected, strict=True):
        assert_close(got, want, torch.bfloat16)


def lora_prune_layer(lead=(2, 9), in_features=48, out_features=40, rank=5):
    """A LoraPruneLinear with random (non-zero) factors, and its input."""
    import loraprune.nn as lora_nn

    layer = make_layer(lead, in_features, out_features, rank)
    module = lora_nn.LoraPruneLinear(layer["weight"], layer["bias"], rank, 8.5).to(DEVICE)
    with torch.no_grad():
        module.lora_A.copy_(layer["lora_a"])
        module.lora_B.copy_(layer["lora_b"])
    return module, layer["x"].detach()


def check_against_reference(module, x: torch.Tensor, grad_seed: int = 2) -> None:
    """The module's forward and gradients (x, A, B) against the reference run on copies of its
    current masks (what the torch backend computes)."""
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = module(x)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed)).to(y)
    y.backward(grad_y)
    ref = {
        "x": x.detach().clone().requires_grad_(),
        "lora_a": module.lora_A.detach().clone().requires_grad_(),
    }
    ref["lora_b"] = module.lora_B.detach().clone().requires_grad_()
    y_ref = masked_lora_linear_reference(
        ref["x"], module.weight, module.bias, ref["lora_a"], ref["lora_b"], module.scaling,
        module.out_mask.clone(), module.in_mask.clone(),
    )  # fmt: skip
    y_ref.backward(grad_y)
    for got, want in zip(
        (y, x.grad, module.lora_A.grad, module.lora_B.grad), (y_ref, *(ref[k].grad for k in ref)), strict=True
    ):
        assert_close(got.detach(), want.detach(), torch.float32)


@pytest.mark.parametrize("host_reads", ["free", "synchronising"])
@pytest.mark.parametrize("start", ["masked", "all_kept"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_mask_writes_that_bypass_the_version_counter_take_effect(monkeypatch, backend, start, host_reads):
    """Issue #28, item 2: the cached plan was keyed on (data_ptr, _version), which a write through
    ``.data`` leaves as it was, so the kernels gathered with a stale order (Y off by 3.6 and dB by
    5.7 here) and the backward mixed it with the live mask; and a mask that was all kept was
    ignored by both backends after such a write (Y off by 7.9). Forward and every gradient against
    the reference on the live masks after each write; "synchronising": the masks are not read on
    the host per call, as on a GPU (masks always passed, applied in place unless known masked)."""
    import loraprune.nn as lora_nn

    monkeypatch.setenv("LORAPRUNE_BACKEND", backend)
    if host_reads == "synchronising":
        monkeypatch.setattr(lora_nn, "_host_reads_are_free", lambda mask: False)
    module, x = lora_prune_layer()
    if start == "masked":
        module.set_masks(*make_masks("both_random", 40, 48))
    check_against_reference(module, x)
    kept_out, kept_in = module.out_mask.nonzero().flatten(), module.in_mask.nonzero().flatten()
    module.out_mask.data[kept_out[[0, 3]]] = False
    module.in_mask.data[kept_in[:20]] = False
    check_against_reference(module, x)
    module.out_mask.data[:] = True  # masked features back
    module.out_mask.data[-1] = False
    check_against_reference(module, x)
    if backend == "triton" and host_reads == "synchronising":
        # The writes left the versions as they were: whether all is kept is the last known answer
        # (all kept: applied in place, correct but without the gather), until set_masks() re-reads.
        plan = module._kernel_plan(module.out_mask, module.in_mask, module._out_masked, module._in_masked)
        assert (plan.out_order is not None) == (start == "masked")
        module.set_masks()
        plan = module._kernel_plan(module.out_mask, module.in_mask, module._out_masked, module._in_masked)
        assert plan.out_order is not None and plan.in_tiles is not None
        check_against_reference(module, x)


def test_cached_mask_plan_matches_the_plan_and_is_rebuilt_only_when_the_mask_changes():
    """The device-side refresh (one program: compare the mask with the plan's snapshot, rebuild
    where they differ) gives masked_lora_linear_plan's order, count and K-tile lists, rebuilds
    nothing for an unchanged mask, and keeps its buffers (their addresses) for good."""
    for size in (1, 37, 80, 1100):
        plan = kernel.CachedMaskPlan(size, DEVICE)
        buffers = {name: getattr(plan, name).data_ptr() for name in ("snapshot", "order", "tiles", "count")}
        for num_masked in (0, size // 3, size):
            mask = scattered_mask(size, num_masked, seed=size + num_masked)
            plan.refresh(mask)
            expected = masked_lora_linear_plan(mask, mask)
            assert torch.equal(plan.snapshot, mask) and plan.count.item() == expected.out_count.item()
            assert torch.equal(plan.order, expected.out_order)
            assert torch.equal(plan.tiles, expected.in_tiles)
            assert torch.equal(plan.tile_counts, expected.in_tile_counts)
        plan.order.fill_(-1)
        plan.refresh(mask.clone())  # the same content: nothing rebuilt
        assert (plan.order == -1).all()
        mask[0] = not mask[0]
        plan.refresh(mask)
        assert torch.equal(plan.order, masked_lora_linear_plan(mask, None).out_order)
        assert buffers == {name: getattr(plan, name).data_ptr() for name in buffers}


def test_lora_prune_linear_caches_the_mask_plan_on_the_device(monkeypatch):
    """The mask_cache path, on a layer whose masks are read on the host once per version (as on a
    GPU): no plan built on the host and no argsort, per call or per mask change, the plan's buffers
    refreshed in place (the same addresses after set_masks, an in-place edit and load_state_dict),
    each forward and backward matching the reference; without mask_cache, a plan per call."""
    import loraprune.nn as lora_nn

    monkeypatch.setenv("LORAPRUNE_BACKEND", "triton")
    monkeypatch.setattr(lora_nn, "_host_reads_are_free", lambda mask: False)
    module, x = lora_prune_layer()
    builds, sorts = [0], [0]
    build_plan, argsort = lora_nn.masked_lora_linear_plan, torch.argsort

    def counting_build(*args, **kwargs):
        builds[0] += 1
        return build_plan(*args, **kwargs)

    def counting_argsort(*args, **kwargs):
        sorts[0] += 1
        return argsort(*args, **kwargs)

    monkeypatch.setattr(lora_nn, "masked_lora_linear_plan", counting_build)
    monkeypatch.setattr(torch, "argsort", counting_argsort)
    module.set_masks(*make_masks("both_random", 40, 48))
    check_against_reference(module, x)
    plans = {key: (plan.order.data_ptr(), plan.tiles.data_ptr()) for key, plan in module._plan_cache.items()}
    assert {name for name, _ in plans} == {"out_mask", "in_mask"}
    module.set_masks(out_mask=make_masks("head_blocks", 40, 48)[0])
    check_against_reference(module, x)
    with torch.no_grad():
        module.in_mask[:8] = False
    check_against_reference(module, x)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    state["out_mask"][::3] = False
    module.load_state_dict(state)
    check_against_reference(module, x)
    assert builds[0] == 0 and sorts[0] == 0
    assert plans == {
        key: (plan.order.data_ptr(), plan.tiles.data_ptr()) for key, plan in module._plan_cache.items()
    }
    monkeypatch.setenv("LORAPRUNE_MLL_FAST_PATHS", "k_tiles,dropout_bits,decode")  # no mask_cache
    check_against_reference(module, x)
    assert builds[0] == 1 and sorts[0] > 0


def test_set_masks_is_refused_during_a_cuda_graph_capture(monkeypatch):
    """Issue #28, item 3: the copy into the mask buffers would be captured (and replayed); masks
    change between replays instead, which re-check the cached plans on the device."""
    import loraprune.nn as lora_nn

    module, _ = lora_prune_layer()
    monkeypatch.setattr(lora_nn, "_capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="capture"):
        module.set_masks(out_mask=torch.zeros(40, dtype=torch.bool, device=DEVICE))
    assert module.out_mask.all()


def test_default_fast_paths_are_the_four_that_remove_work(monkeypatch):
    """decode_split_k, lora_k_steps, persistent and tma stay selectable, off by default, until a
    GPU run measures them faster than the paths they replace."""
    monkeypatch.delenv("LORAPRUNE_MLL_FAST_PATHS", raising=False)
    assert (
        enabled_fast_paths() == {"mask_cache", "k_tiles", "dropout_bits", "decode"} == set(DEFAULT_FAST_PATHS)
    )
    for value, expected in (
        ("default", set(DEFAULT_FAST_PATHS)),
        ("all", set(FAST_PATHS)),
        ("none", set()),
        ("default,tma", {*DEFAULT_FAST_PATHS, "tma"}),
        ("decode, lora_k_steps", {"decode", "lora_k_steps"}),
    ):
        monkeypatch.setenv("LORAPRUNE_MLL_FAST_PATHS", value)
        assert enabled_fast_paths() == expected, value
    monkeypatch.setenv("LORAPRUNE_MLL_FAST_PATHS", "default,fastest")
    with pytest.raises(ValueError, match="fastest"):
        enabled_fast_paths()


IN_PLACE_CASES = {  # (leading shape of x, in, out, rank, fast paths): the GEMM, decode, split-K decode
    "prefill": ((19,), 72, 66, 6, frozenset(DEFAULT_FAST_PATHS)),
    "decode": ((7,), 72, 66, 6, frozenset(DEFAULT_FAST_PATHS)),
    "split_k": ((7,), 600, 40, 5, frozenset({"decode_split_k"})),
}


@pytest.mark.parametrize("case", IN_PLACE_CASES.values(), ids=IN_PLACE_CASES.keys())
def test_masks_applied_in_place_match_reference(case):
    """A plan without the kept-first order applies the output mask in place (every feature computed,
    the masked ones zeroed: what a layer does with a mask it does not know to be masked), in the
    forward GEMM, the decode kernels and the backward; whole masked tiles included (head blocks)."""
    lead, in_features, out_features, rank, paths = case
    layer = make_layer(lead, in_features, out_features, rank)
    out_mask, in_mask = make_masks("head_blocks", out_features, in_features)
    plan = masked_lora_linear_plan(out_mask, in_mask, k_tiles=False, gather_out=False)
    assert plan.out_order is None and plan.in_tiles is None
    actual = run(
        functools.partial(kernel.masked_lora_linear, plan=plan, fast_paths=paths), layer, out_mask, in_mask
    )
    expected = run(masked_lora_linear_reference, layer, out_mask, in_mask)
    for got, want in zip(actual, expected, strict=True):
        assert_close(got, want, torch.float32)
    assert not actual[0][..., ~out_mask].any() and not actual[3][~out_mask].any()


@pytest.mark.skipif(not triton_interpreter(), reason="the interpreter's target is sm_90 whatever the host")
def test_tma_is_not_taken_for_overlapping_or_zero_row_strides(monkeypatch):
    """Issue #28, item 4: a gradient expanded from one row (``y.backward(v.expand_as(y))``: row
    stride 0) passed the 16-byte checks and became a TMA descriptor in dX; rows must not overlap."""
    t = torch.zeros(8, 64)
    assert kernel._tma_describable(t) and kernel._tma_describable(t.t())
    assert not kernel._tma_describable(t[:1].expand(8, 64))
    assert not kernel._tma_describable(torch.zeros(8 * 32 + 32).as_strided((8, 64), (32, 1)))
    assert not kernel._tma_describable(t.t().contiguous().t()[:, :1].expand(8, 64).t())
    launches = gemm_launches(monkeypatch)
    lead, in_features, out_features, rank = GEMM_SHAPES["aligned"]
    layer = make_layer(lead, in_features, out_features, rank)
    out_mask, in_mask = make_masks("in_only", out_features, in_features)
    row = torch.randn(out_features, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    results = []
    for fn in (with_paths(GEMM_PATHS["tma"]), masked_lora_linear_reference):
        x, a, b = (layer[k] for k in ("x", "lora_a", "lora_b"))
        y = fn(x, layer["weight"], layer["bias"], a, b, layer["scaling"], out_mask, in_mask, 0.0, False)
        grad_y = row.expand_as(y)
        assert grad_y.stride(0) == 0
        results.append((y.detach(), *torch.autograd.grad(y, (x, a, b), grad_y)))
    by_kind = {launch["KIND"]: launch for launch in launches}
    assert by_kind["forward"]["TMA"] and not by_kind["dx"]["TMA"]
    for got, want in zip(*results, strict=True):
        assert_close(got, want, torch.float32)


def test_decode_split_k_ranges_do_not_depend_on_the_tuned_block(monkeypatch):
    """Issue #28, item 5: each split's K range was rounded to the autotuned BLOCK_Q, so processes that
    tuned differently summed different ranges (K = 1000 over 3 splits: 352 wide at BLOCK_Q 32, 384
    at 64) and disagreed in the last bits. Each partial in the workspace is the product over whole
    DECODE_SPLIT_GRANULE granules, whatever the config."""
    import triton

    layer = make_layer((5,), 1000, 45, 6)
    args = [layer[k].detach() for k in ("x", "weight", "bias", "lora_a", "lora_b")]
    x, weight = args[0].double(), args[1].double()
    splits, granule = 3, kernel.DECODE_SPLIT_GRANULE
    width = math.ceil(math.ceil(1000 / splits) / granule) * granule
    empty = torch.empty
    workspaces: list[torch.Tensor] = []

    def spy_empty(*shape, **kwargs):
        t = empty(*shape, **kwargs)
        if kwargs.get("dtype") == torch.float32 and t.ndim == 3:
            workspaces.append(t)
        return t

    for block_q in (32, 64):
        monkeypatch.setattr(kernel._decode_split_kernel, "configs", [triton.Config({"BLOCK_Q": block_q})])
        workspaces.clear()
        monkeypatch.setattr(torch, "empty", spy_empty)
        kernel._decode_split_k(*args, layer["scaling"], None, None, splits)
        monkeypatch.setattr(torch, "empty", empty)
        partials = workspaces[0]
        for split in range(splits):
            ks = slice(split * width, min((split + 1) * width, 1000))
            expected = (x[:, ks] @ weight[:, ks].t()).float()
            assert_close(partials[split], expected, torch.float32)


def test_dropout_bits_of_skipped_k_tiles_are_written(monkeypatch):
    """Issue #28, item 6: with kept K tiles the forward stored no keep bits for the skipped tiles
    (an uninitialised buffer), while dA and dX read whole byte rows (compute-sanitizer's initcheck
    would flag it). They are zeros now; the others are the keep-mask's bits."""
    lead, in_features, out_features, rank = (19,), 160, 40, 5
    layer = make_layer(lead, in_features, out_features, rank)
    in_mask = torch.ones(in_features, dtype=torch.bool, device=DEVICE)
    in_mask[32:96] = False  # two whole 32-wide tiles (the interpreter's BLOCK_Q)
    in_mask[100] = False
    plan = masked_lora_linear_plan(None, in_mask)
    new_empty = torch.Tensor.new_empty

    def poisoned_new_empty(self, *args, **kwargs):
        t = new_empty(self, *args, **kwargs)
        return t.fill_(0xA5) if t.dtype == torch.uint8 else t

    monkeypatch.setattr(torch.Tensor, "new_empty", poisoned_new_empty)
    torch.manual_seed(3)
    seed = kernel.draw_dropout_seed(DEVICE)
    args = [layer[k].detach() for k in ("x", "weight", "bias", "lora_a", "lora_b")]
    _, _, bits = torch.ops.loraprune.masked_lora_linear(
        *args,
        layer["scaling"],
        None,
        in_mask,
        0.3,
        seed,
        None,
        None,
        plan.in_tiles,
        plan.in_tile_counts,
        True,
    )
    monkeypatch.undo()
    keep = kernel.dropout_keep_mask(seed, 19, in_features, 0.3, dropout_bits=True)
    keep[:, 32:96] = False
    expected = (keep.view(19, in_features // 8, 8).int() << torch.arange(8, device=DEVICE)).sum(-1)
    assert torch.equal(bits.int(), expected)


@requires_cuda
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_cuda_graph_replays_follow_mask_changes(training):
    """Issue #28, item 3: a graph captured with the layer's cached plans replays correctly after
    set_masks (and after a write through .data) between replays: the plan's buffers are never freed
    and each replay re-checks them on the device. The documented recipe: run the step once eagerly
    (every autotune key tuned) before capturing; set_masks is refused during the capture."""
    module, x = lora_prune_layer((2, 300), 4096, 4096, 8)
    module = module.to(torch.bfloat16)
    module.weight.requires_grad_(False)
    module.train(training)
    module.set_masks(scattered_mask(4096, 2048), scattered_mask(4096, 1024, seed=5))
    static_x = x.to(torch.bfloat16).requires_grad_(training)

    def step() -> torch.Tensor:
        y = module(static_x)
        if training:
            y.backward(torch.ones_like(y))
        return y

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.set_grad_enabled(training):
        for _ in range(2):  # the warm-up: every kernel compiled and tuned for these keys
            module.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(stream)
    module.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.set_grad_enabled(training):
        static_y = step()
        with pytest.raises(RuntimeError, match="capture"):
            module.set_masks(out_mask=torch.ones(4096, dtype=torch.bool, device="cuda"))
    static_grad_b = module.lora_B.grad  # written by each replay (None before the capture: assigned)
    for change in ("set_masks", "data"):
        if change == "set_masks":
            module.set_masks(scattered_mask(4096, 1000, seed=7), scattered_mask(4096, 3000, seed=8))
        else:
            module.out_mask.data[module.out_mask.nonzero().flatten()[:100]] = False
        graph.replay()
        torch.cuda.synchronize()
        module.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(training):
            expected = step()
        assert torch.equal(static_y, expected)
        if training:
            assert torch.equal(static_grad_b, module.lora_B.grad)
        assert not static_y[..., ~module.out_mask].any()


@requires_cuda
def test_decode_split_k_is_bitwise_identical_across_tuned_configs(monkeypatch):
    """Issue #28, item 5 on the device: every config of the split kernel gives the same bits (the
    K ranges are whole granules, whichever BLOCK_Q the autotuner picked)."""
    layer = make_layer((1,), 11008, 4096, 8, dtype=torch.bfloat16)
    args = [layer[k].detach() for k in ("x", "weight", "bias", "lora_a", "lora_b")]
    splits = kernel.decode_splits(4096, 11008, DEVICE)
    assert splits > 1
    configs = kernel._decode_split_kernel.configs
    outputs = []
    for config in configs:
        monkeypatch.setattr(kernel._decode_split_kernel, "configs", [config])
        outputs.append(kernel._decode_split_k(*args, layer["scaling"], None, None, splits))
    for y, hidden in outputs[1:]:
        assert torch.equal(y, outputs[0][0]) and torch.equal(hidden, outputs[0][1])


@pytest.mark.parametrize("path", FAST_PATHS)
def test_fast_path_benchmark_cases_agree_with_their_reference(monkeypatch, path):
    """benchmarks/kernel_cases.py's fast-path cases at a tiny size, float32, every provider but the
    dense GEMM checked as the GPU run checks it (so the cases are ready for a GPU)."""
    from conftest import REPO_ROOT

    monkeypatch.syspath_prepend(str(REPO_ROOT))
    from benchmarks import kernel_cases

    monkeypatch.setattr(kernel_cases, "WEIGHT_DTYPE", torch.float32)
    case = {
        "decode": kernel_cases.FastPathCase("tiny", 256, 48, 4, 5, 0.5, False, path="decode"),
        "decode_split_k": kernel_cases.FastPathCase("tiny", 600, 48, 4, 5, 0.5, False, path="decode_split_k"),
        "k_tiles": kernel_cases.FastPathCase(
            "tiny", 256, 48, 4, 20, 0.0, False, path="k_tiles", in_masked=True
        ),
        "dropout_bits": kernel_cases.FastPathCase(
            "tiny", 64, 48, 4, 20, 0.0, True, path="dropout_bits", dropout=0.2
        ),
        "mask_cache": kernel_cases.FastPathCase("tiny", 64, 48, 4, 20, 0.5, True, path="mask_cache"),
        "lora_k_steps": kernel_cases.FastPathCase("tiny", 64, 48, 4, 40, 0.5, True, path="lora_k_steps"),
        "persistent": kernel_cases.FastPathCase("tiny", 64, 48, 4, 40, 0.0, True, path="persistent"),
        "tma": kernel_cases.FastPathCase("tiny", 64, 48, 4, 40, 0.0, True, path="tma"),
    }[path]
    inputs = kernel_cases.fast_path_inputs(case, DEVICE, seed=0)
    for provider in kernel_cases.FAST_PATH_PROVIDERS:
        if provider == "dense":
            continue
        with torch.random.fork_rng(devices=[]):
            result = kernel_cases.fast_path_provider(provider, case)(inputs)
        expected = kernel_cases.fast_path_reference(inputs, case, provider)
        assert kernel_cases.relative_error(result, expected) < 1e-4, provider
