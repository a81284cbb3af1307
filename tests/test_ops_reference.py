"""The PyTorch references of loraprune.ops against first principles, and the dispatch rules."""

from __future__ import annotations

import pytest
import torch

from loraprune import ops
from loraprune.ops import _dispatch


def _factors(out_features: int, in_features: int, rank: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(shape, generator=g, dtype=torch.float32)
        for shape in (
            (out_features, in_features),
            (rank, in_features),
            (out_features, rank),
            (rank, in_features),
            (out_features, rank),
        )
    ]


def test_lora_gradients_and_estimated_grad_closed_form():
    """For L = <Y, C> with Y = X (W + sBA)ᵀ the factor gradients are s·Gᵂ·Aᵀ and s·Bᵀ·Gᵂ, and
    G = gB·A + B·gA − gB·gA equals BA − (B − gB)(A − gA): the first-order step expansion."""
    torch.manual_seed(0)
    w, a, b, _, _ = _factors(7, 5, 3)
    a.requires_grad_(True)
    b.requires_grad_(True)
    x, c, s = torch.randn(4, 5), torch.randn(4, 7), 1.7
    y = ops.masked_lora_linear(x, w, None, a, b, s)
    (y * c).sum().backward()
    grad_w = c.T @ x
    torch.testing.assert_close(b.grad, s * grad_w @ a.detach().T)
    torch.testing.assert_close(a.grad, s * b.detach().T @ grad_w)
    a_, b_, ga, gb = a.detach(), b.detach(), a.grad, b.grad
    estimated = gb @ a_ + b_ @ ga - gb @ ga
    torch.testing.assert_close(estimated, b_ @ a_ - (b_ - gb) @ (a_ - ga))


@pytest.mark.parametrize("squared", [False, True])
def test_lora_importance_matches_brute_force(squared):
    w, a, b, ga, gb = _factors(6, 5, 3, seed=3)
    s = 0.75
    rows, cols = ops.lora_importance(w, a, b, ga, gb, s, squared=squared)
    expected = torch.zeros(6, 5, dtype=torch.float64)
    for i in range(6):
        for j in range(5):
            g = sum(gb[i, k] * a[k, j] + b[i, k] * ga[k, j] - gb[i, k] * ga[k, j] for k in range(3))
            merged = w[i, j] + s * sum(b[i, k] * a[k, j] for k in range(3))
            expected[i, j] = (g * merged) ** 2 if squared else abs(g * merged)
    assert rows.dtype == torch.float32 and cols.dtype == torch.float32
    torch.testing.assert_close(rows, expected.sum(1).float())
    torch.testing.assert_close(cols, expected.sum(0).float())


def test_score_update_normalises_folds_and_averages():
    scores = torch.full((3,), -1.0)
    updates, skipped = torch.zeros((), dtype=torch.int64), torch.zeros((), dtype=torch.int64)
    p1, p2 = torch.tensor([3.0, 4.0, 0.0, 0.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, 1.0])
    ops.score_update(scores, [p1, p2], 0.9, updates, skipped)
    first = torch.tensor([0.6 + 0.8, 0.0, 0.0]) + p2 / 3**0.5
    torch.testing.assert_close(scores, first)  # the first update sets the scores
    p3 = torch.tensor([0.0, 2.0, 0.0])
    ops.score_update(scores, [p3], 0.9, updates, skipped)
    torch.testing.assert_close(scores, 0.9 * first + 0.1 * torch.tensor([0.0, 1.0, 0.0]))
    assert (int(updates), int(skipped)) == (2, 0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_score_update_skips_non_finite_steps(bad):
    scores = torch.tensor([1.0, 2.0])
    updates, skipped = torch.ones((), dtype=torch.int64), torch.zeros((), dtype=torch.int64)
    ops.score_update(scores, [torch.tensor([1.0, bad])], 0.9, updates, skipped)
    assert scores.tolist() == [1.0, 2.0] and (int(updates), int(skipped)) == (1, 1)


def test_score_update_zero_part_contributes_nothing():
    scores = torch.zeros(2)
    updates, skipped = torch.zeros((), dtype=torch.int64), torch.zeros((), dtype=torch.int64)
    ops.score_update(scores, [torch.zeros(4), torch.tensor([0.0, 5.0])], 0.5, updates, skipped)
    assert scores.tolist() == [0.0, 1.0] and int(skipped) == 0


def test_masked_lora_linear_masks_are_exact_zeros_with_zero_gradients():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 10)
    w, bias = torch.randn(8, 10), torch.randn(8)
    a, b = torch.randn(4, 10, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    out_mask, in_mask = torch.rand(8) > 0.5, torch.rand(10) > 0.5
    y = ops.masked_lora_linear(x, w, bias, a, b, 2.0, out_mask, in_mask)
    assert torch.all(y[..., ~out_mask] == 0)
    expected = (x * in_mask) @ (w + 2.0 * b @ a).T + bias
    torch.testing.assert_close(y[..., out_mask], expected[..., out_mask])
    y.square().sum().backward()
    assert torch.all(b.grad[~out_mask] == 0) and torch.all(a.grad[:, ~in_mask] == 0)


def test_compact_linear_slices_merged_weight():
    torch.manual_seed(0)
    w, bias, a, b = (
        torch.randn(6, 5).bfloat16(),
        torch.randn(6).bfloat16(),
        torch.randn(2, 5),
        torch.randn(6, 2),
    )
    rows, cols = torch.tensor([0, 2, 5]), torch.tensor([1, 4])
    new_w, new_b = ops.compact_linear(w, bias, a, b, 0.5, rows, cols)
    expected = (w.float() + 0.5 * b @ a)[rows][:, cols].bfloat16()
    assert new_w.dtype == torch.bfloat16 and torch.equal(new_w, expected) and torch.equal(new_b, bias[rows])
    plain, _ = ops.compact_linear(w, None, None, None, 0.0, None, cols)
    assert torch.equal(plain, w[:, cols])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: ops.lora_importance(
                torch.randn(4, 3),
                torch.randn(2, 3),
                torch.randn(5, 2),
                torch.randn(2, 3),
                torch.randn(5, 2),
                1.0,
            ),
            "lora_b",
        ),
        (
            lambda: ops.lora_importance(
                torch.randn(4, 3).long(),
                torch.randn(2, 3),
                torch.randn(4, 2),
                torch.randn(2, 3),
                torch.randn(4, 2),
                1.0,
            ),
            "weight",
        ),
        (
            lambda: ops.masked_lora_linear(
                torch.randn(2, 4), torch.randn(5, 3), None, torch.randn(2, 3), torch.randn(5, 2), 1.0
            ),
            "x",
        ),
        (
            lambda: ops.masked_lora_linear(
                torch.randn(2, 3),
                torch.randn(5, 3),
                None,
                torch.randn(2, 3),
                torch.randn(5, 2),
                1.0,
                torch.ones(5),
            ),
            "out_mask",
        ),
        (
            lambda: ops.masked_lora_linear(
                torch.randn(2, 3),
                torch.randn(5, 3),
                None,
                torch.randn(2, 3),
                torch.randn(5, 2),
                1.0,
                dropout_p=1.0,
            ),
            "dropout_p",
        ),
        (
            lambda: ops.score_update(
                torch.zeros(3),
                [torch.ones(4)],
                0.9,
                torch.zeros((), dtype=torch.int64),
                torch.zeros((), dtype=torch.int64),
            ),
            r"parts\[0\]",
        ),
        (
            lambda: ops.score_update(
                torch.zeros(2),
                [torch.ones(4)],
                1.0,
                torch.zeros((), dtype=torch.int64),
                torch.zeros((), dtype=torch.int64),
            ),
            "decay",
        ),
        (
            lambda: ops.compact_linear(torch.randn(4, 3), None, None, None, 0.0, torch.tensor([4]), None),
            "rows",
        ),
    ],
)
def test_ops_reject_bad_input_naming_the_argument(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_dispatch_rules(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    name, _ = _dispatch.resolve("lora_importance", {"cuda": "x:y", "triton": "x:y", "torch": len}, cpu)
    assert name == "torch"  # CPU tensors take the reference automatically
    monkeypatch.setenv(_dispatch.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=_dispatch.ENV_VAR):
        _dispatch.resolve("op", {"torch": len}, cpu)
    monkeypatch.setenv(_dispatch.ENV_VAR, "cuda")
    with pytest.raises(ops.BackendUnavailableError, match="cuda"):
        _dispatch.resolve("op", {"cuda": "x:y", "torch": len}, cpu)
    # an op without the forced backend falls back to the automatic choice after it
    assert _dispatch.resolve("op", {"torch": len}, cpu)[0] == "torch"
    with pytest.raises(ops.BackendUnavailableError):
        ops.lora_importance(
            torch.randn(4, 3), torch.randn(2, 3), torch.randn(4, 2), torch.randn(2, 3), torch.randn(4, 2), 1.0
        )


def test_dispatch_passes_over_a_backend_that_cannot_take_the_inputs(monkeypatch):
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    gpu = torch.device("cuda")  # resolve reads only the device type: no GPU is touched
    implementations = {"triton": len, "torch": abs}
    if _dispatch.backend_unavailable_reason("triton", gpu) is None:
        assert _dispatch.resolve("op", implementations, gpu)[0] == "triton"
    unsupported = {"triton": "its kernel takes rank <= 128, got 129"}
    assert _dispatch.resolve("op", implementations, gpu, None, unsupported)[0] == "torch"
    with pytest.raises(ops.BackendUnavailableError, match="rank <= 128, got 129"):
        _dispatch.resolve("op", implementations, gpu, "triton", unsupported)


def test_importance_above_the_triton_rank_limit_names_the_rank():
    from loraprune.ops.lora_importance import TRITON_MAX_RANK

    rank = TRITON_MAX_RANK + 1
    factors = torch.randn(rank, 3), torch.randn(4, rank)
    with pytest.raises(ops.BackendUnavailableError, match=f"got {rank}"):
        ops.lora_importance(torch.randn(4, 3), *factors, *factors, 1.0, backend="triton")
