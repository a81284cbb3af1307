"""The closed-form refit of o_proj and down_proj (``reconstruct``): the solve against a least-squares
reference, the output error it lowers, compaction and saving after it, bad input; the refit-aware
selection (criterion ``reconstruction``): its removal cost against the refit it anticipates, its moments against
a reference recorded from the same forwards, resume."""

from __future__ import annotations

import pytest
import torch
from tiny_models import aligned_model, biased_llama, random_tokens, randomize_lora, tiny_model
from transformers import AutoModelForCausalLM

import loraprune  # noqa: F401  (registers the pruned classes)
from loraprune import LoraPruneConfig, LoraPruner
from loraprune.refit import (
    ConsumerStatistics,
    calibration_windows,
    output_error,
    reconstruct,
    reconstruct_options,
    removal_costs,
    ridge_refit,
)


def masked_pruner(model: torch.nn.Module, layers=(1, 2)) -> LoraPruner:
    pruner = LoraPruner(model, LoraPruneConfig(ratio=0.5, criterion="magnitude", layers=layers))
    randomize_lora(model)
    pruner.update_scores()
    pruner.prune()
    model.eval()  # the patched projections too (no LoRA dropout)
    return pruner


def least_squares_reference(x, weight, bias, keep, lam):
    """argmin over (W′, b′) of Σ_t ‖W x_t + b − W′ x_S,t − b′‖² + N·λ_abs·‖W′ − W_S‖², by lstsq on the
    stacked system (b′ free, absent without a bias); λ_abs = λ · mean diag of the (centred) covariance."""
    n = x.shape[0]
    target = x @ weight.T + (0 if bias is None else bias)
    cov = (x.T @ x) / n
    if bias is not None:
        mean = x.mean(0)
        cov = cov - torch.outer(mean, mean)
    ridge = lam * float(cov.diagonal().mean())
    design = x[:, keep]
    if bias is not None:
        design = torch.cat([design, torch.ones(n, 1, dtype=x.dtype)], 1)
    kept = int(keep.sum())
    penalty = torch.zeros(kept, design.shape[1], dtype=x.dtype)
    penalty[:, :kept] = torch.eye(kept, dtype=x.dtype) * (n * ridge) ** 0.5
    stacked = torch.cat([design, penalty])
    rhs = torch.cat([target, (n * ridge) ** 0.5 * weight[:, keep].T])
    solution = torch.linalg.lstsq(stacked, rhs).solution.T
    return solution[:, :kept], (None if bias is None else solution[:, kept])


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("lam", [0.0, 0.3])
def test_ridge_refit_equals_the_least_squares_reference(with_bias, lam):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, 12, generator=generator, dtype=torch.float64) @ torch.randn(
        12, 12, generator=generator, dtype=torch.float64
    ) + torch.randn(12, generator=generator, dtype=torch.float64)  # correlated, off-centre
    weight = torch.randn(5, 12, generator=generator, dtype=torch.float64)
    bias = torch.randn(5, generator=generator, dtype=torch.float64) if with_bias else None
    keep = torch.zeros(12, dtype=torch.bool)
    keep[[0, 2, 3, 7, 8, 11]] = True
    statistics = ConsumerStatistics((x.T @ x) / len(x), x.mean(0), len(x))
    refit, new_bias = ridge_refit(weight, bias, statistics, keep, lam)
    want_weight, want_bias = least_squares_reference(x, weight, bias, keep, lam)
    torch.testing.assert_close(refit, want_weight, rtol=1e-8, atol=1e-8)
    if with_bias:
        torch.testing.assert_close(new_bias, want_bias, rtol=1e-8, atol=1e-8)
    else:
        assert new_bias is None
    if lam > 0:  # the ridge pulls toward W_S, not toward zero
        unridged, _ = ridge_refit(weight, bias, statistics, keep, 0.0)
        assert (refit - weight[:, keep]).norm() < (unridged - weight[:, keep]).norm()


def _consumer_input(model, path, producers, windows):
    """The consumer's input on ``windows`` with its producers unmasked, and its merged weight and bias."""
    consumer = model.get_submodule(path)
    seen = []
    handle = consumer.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].reshape(-1, m.in_features))
    )
    saved = {p: model.get_submodule(p).out_mask.clone() for p in producers}
    for p in producers:
        model.get_submodule(p).set_masks(out_mask=torch.ones_like(saved[p]))
    with torch.no_grad():
        model(input_ids=windows)
    handle.remove()
    for p, mask in saved.items():
        model.get_submodule(p).set_masks(out_mask=mask)
    bias = None if consumer.bias is None else consumer.bias.detach().clone()
    return torch.cat(seen).double(), consumer.merged_weight().double(), bias


@pytest.mark.parametrize("with_bias", [False, True])
def test_refit_lowers_the_consumers_output_error_on_the_calibration_data(with_bias):
    model = biased_llama() if with_bias else tiny_model("llama-gqa-tied", layers=3)
    masked_pruner(model)
    windows = random_tokens(batch=16, length=16, seed=3)
    prefix = "model.layers.1.self_attn."
    path = prefix + "o_proj"
    producers = [prefix + name for name in ("q_proj", "k_proj", "v_proj")]
    x, weight, bias = _consumer_input(model, path, producers, windows)
    consumer = model.get_submodule(path)
    keep = consumer.in_mask
    target = x @ weight.T + (0 if bias is None else bias.double())
    masked = x[:, keep] @ weight[:, keep].T + (0 if bias is None else bias.double())
    refits = reconstruct(model, windows, lam=0.0, batch_size=4)
    assert [r.path for r in refits] == [
        f"model.layers.{i}.{part}" for i in (1, 2) for part in ("self_attn.o_proj", "mlp.down_proj")
    ]
    assert not consumer.lora_B.any()  # LoRA merged into the refit weight
    new_bias = 0 if consumer.bias is None else consumer.bias.double()
    refit = x[:, keep] @ consumer.merged_weight().double()[:, keep].T + new_bias
    before = (target - masked).square().sum()
    after = (target - refit).square().sum()
    assert after < 0.95 * before
    # λ = 0: the least-squares optimum on these tokens (normal equations; b′ absorbs the mean residual)
    residual = target - refit
    scale = (target.T @ x[:, keep]).norm()
    assert (residual.T @ x[:, keep]).norm() < 1e-4 * scale
    if with_bias:
        assert residual.sum(0).norm() < 1e-4 * target.sum(0).norm()
    # the reported errors are these, relative to E‖W x‖²
    energy = (x @ weight.T).square().sum()
    assert refits[0].error_before == pytest.approx(float(before / energy), rel=1e-4)
    assert refits[0].error_after == pytest.approx(float(after / energy), rel=1e-4)
    assert all(r.error_after < r.error_before for r in refits)


@pytest.mark.parametrize("name", ["gemma2-gqa-tied-softcap", "gemma3-gqa-tied"])
def test_refit_feeds_each_layer_its_own_mask_and_rope(name):
    """Gemma's layer 0 has a sliding window (8, under 16-token windows) and layer 1 is global (Gemma 3:
    with another RoPE base): layer 1's refit runs on layer 1's own attention mask and RoPE tables, so
    with λ = 0 it is the least-squares optimum on the inputs a full forward gives its o_proj."""
    from test_families import family_model

    model = family_model(name, layers=3)
    assert model.config.layer_types[:2] == ["sliding_attention", "full_attention"]
    masked_pruner(model)
    windows = random_tokens(batch=16, length=16, seed=3)
    prefix = "model.layers.1.self_attn."
    x, weight, _ = _consumer_input(
        model, prefix + "o_proj", [prefix + p for p in ("q_proj", "k_proj", "v_proj")], windows
    )
    reconstruct(model, windows, lam=0.0, batch_size=4)
    consumer = model.get_submodule(prefix + "o_proj")
    keep = consumer.in_mask
    residual = x @ weight.T - x[:, keep] @ consumer.merged_weight().double()[:, keep].T
    scale = ((x @ weight.T).T @ x[:, keep]).norm()
    assert (residual.T @ x[:, keep]).norm() < 1e-4 * scale
    assert all(
        "forward" not in layer.__dict__ for layer in model.model.layers
    )  # the capture's stubs are gone


@pytest.mark.parametrize("name", ["llama-gqa-tied", "qwen2-gqa-bias-tied", "llama-biased"])
def test_refit_model_compacts_to_the_masked_models_logits_and_saves(name, tmp_path):
    model = biased_llama() if name == "llama-biased" else tiny_model(name, layers=3)
    pruner = masked_pruner(model)
    tokens = random_tokens(batch=2, length=12, seed=5)
    with torch.no_grad():
        before = model(input_ids=tokens).logits
        reconstruct(model, random_tokens(batch=8, length=16, seed=3), batch_size=4)
        masked = model(input_ids=tokens).logits
    assert not torch.allclose(before, masked, atol=1e-3)  # the refit changed the model
    pruned = pruner.compact().eval()
    with torch.no_grad():
        torch.testing.assert_close(pruned(input_ids=tokens).logits, masked, rtol=1e-4, atol=1e-4)
    pruned.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    if name == "llama-biased":  # the compensated biases are in the checkpoint and loaded
        assert loaded.model.layers[1].mlp.down_proj.bias is not None
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=tokens).logits, masked, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_refit_of_a_quantized_base_requantizes_the_refit_weight(kind):
    pytest.importorskip("bitsandbytes")
    from loraprune.quantization import QuantizedLoraPruneLinear, quant_type

    model = aligned_model()  # nf4 on the CPU needs widths in whole 64-element blocks
    config = LoraPruneConfig(ratio=0.5, criterion="magnitude", layers=(1,), quantize_base=kind)
    pruner = LoraPruner(model, config)
    pruner.update_scores()
    pruner.prune()
    path = "model.layers.1.mlp.down_proj"
    consumer = model.get_submodule(path)
    assert isinstance(consumer, QuantizedLoraPruneLinear)
    old_base, old_weight = consumer.base, consumer.merged_weight()
    reconstruct(model, random_tokens(batch=8, length=16, seed=3), batch_size=4)
    assert consumer.base is not old_base and quant_type(consumer.base) == kind
    refit = consumer.merged_weight()  # the re-quantized weight, dequantized
    kept = consumer.in_mask
    assert (refit[:, kept] - old_weight[:, kept]).abs().max() > 0.05  # moved by more than the rounding
    pruned = pruner.compact()
    torch.testing.assert_close(pruned.get_submodule(path).weight, refit[:, kept])


def test_nothing_to_refit_leaves_the_model_alone():
    model = tiny_model("llama-gqa-tied", layers=3)
    LoraPruner(model, LoraPruneConfig(ratio=0.5, criterion="magnitude"))  # no masks yet
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert reconstruct(model, random_tokens(batch=4, length=16)) == []
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_a_missing_consumer_is_one_clear_error():
    model = tiny_model("llama-gqa-tied", layers=3)
    masked_pruner(model)
    path = "model.layers.1.self_attn.o_proj"
    model.set_submodule(path, model.get_submodule(path).merged_linear())
    with pytest.raises(ValueError, match=f"reconstruct: {path} is not a patched projection"):
        reconstruct(model, random_tokens(batch=4, length=16))


def test_options_are_checked_and_defaulted():
    assert reconstruct_options(False, None, None) == (None, None)
    assert reconstruct_options(True, None, None) == (0.01, 64)
    for lam, samples, name in (
        (-0.1, None, "reconstruct_lambda"),
        (float("nan"), None, "reconstruct_lambda"),
        (None, 0, "reconstruct_samples"),
    ):
        with pytest.raises(ValueError, match=name):
            reconstruct_options(True, lam, samples)
    with pytest.raises(ValueError, match="reconstruct_lambda needs reconstruct"):
        reconstruct_options(False, 0.1, None)
    windows = torch.arange(40).view(10, 4)
    drawn = calibration_windows(windows, 4, seed=1)
    assert len({tuple(w.tolist()) for w in drawn}) == 4 and torch.equal(
        drawn, calibration_windows(windows, 4, 1)
    )
    with pytest.raises(ValueError, match="reconstruct_samples \\(11\\) exceeds the 10 windows"):
        calibration_windows(windows, 11, seed=1)


@pytest.mark.parametrize("width", [1, 3, 12])
@pytest.mark.parametrize("lam", [1e-3, 0.1])
def test_removal_cost_is_what_the_refit_without_the_unit_leaves(width, lam):
    """Each kept unit's cost equals E‖(W′ − W) x‖² + λ‖W′ − W‖² of :func:`ridge_refit` over the kept
    columns without the unit: the refit the criterion anticipates."""
    generator = torch.Generator().manual_seed(width)
    units, out = 5, 7
    columns = units * width
    weight = torch.randn(out, columns, generator=generator, dtype=torch.float64)
    x = torch.randn(300, columns, generator=generator, dtype=torch.float64)
    x = x @ torch.randn(columns, columns, generator=generator, dtype=torch.float64)  # correlated inputs
    covariance = x.T @ x / len(x)
    keep = torch.ones(columns, dtype=torch.bool)
    keep[width : 2 * width] = False  # unit 1 already removed: costs nothing, and is not among S
    costs = removal_costs(weight, covariance, keep, width, lam)
    kept = keep.nonzero().squeeze(1)
    system = covariance[kept][:, kept]
    statistics = ConsumerStatistics(system, torch.zeros(len(kept), dtype=torch.float64), len(x))
    ridge = lam * float(system.diagonal().mean())
    assert costs[1] == 0
    for unit in (0, 2, 3, 4):
        without = (kept // width) != unit
        refit, _ = ridge_refit(weight[:, kept], None, statistics, without, lam)
        difference = -weight[:, kept]
        difference[:, without] += refit
        want = output_error(difference, system) + ridge * float(difference.square().sum())
        torch.testing.assert_close(costs[unit].item(), want, rtol=1e-9, atol=0)


def test_removal_cost_needs_a_ridge_and_zero_inputs_cost_nothing():
    weight, keep = torch.randn(3, 4, dtype=torch.float64), torch.ones(4, dtype=torch.bool)
    with pytest.raises(ValueError, match="lam > 0"):
        removal_costs(weight, torch.eye(4, dtype=torch.float64), keep, 2, 0.0)
    assert torch.equal(removal_costs(weight, torch.zeros(4, 4, dtype=torch.float64), keep, 2), torch.zeros(2))


def recorded_moments(
    pruner: LoraPruner, steps: int, prune_at: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Train ``steps`` steps with criterion ``reconstruction`` (one eval forward between, which must not count),
    recording each consumer's inputs with forward pre-hooks; returns the reference moving averages of
    E[x xᵀ], E[x] per group (fp64, bias-corrected)."""
    consumers = [next(m.path for m in g.members if m.axis == "in") for g in pruner.groups]
    seen: dict[str, list[torch.Tensor]] = {path: [] for path in consumers}
    handles = [
        pruner.model.get_submodule(path).register_forward_pre_hook(
            lambda module, args, path=path: (
                seen[path].append(args[0].detach().reshape(-1, args[0].shape[-1]))
                if module.training and torch.is_grad_enabled()
                else None
            )
        )
        for path in consumers
    ]
    decay = pruner.config.ema_decay
    reference = {path: (0.0, 0.0) for path in consumers}
    for step in range(steps):
        for micro in range(2):  # two micro-batches a step: moments over both
            tokens = random_tokens(batch=2, seed=10 * step + micro)
            pruner.model(input_ids=tokens, labels=tokens).loss.backward()
        with torch.no_grad():
            pruner.model.eval()
            pruner.model(input_ids=random_tokens(batch=1, seed=99))
            pruner.model.train()
        pruner.update_scores()
        pruner.model.zero_grad()
        for path in consumers:
            x = torch.cat(seen[path]).double()
            seen[path].clear()
            second, mean = reference[path]
            reference[path] = (
                decay * second + (1 - decay) * x.T @ x / len(x),
                decay * mean + (1 - decay) * x.mean(dim=0),
            )
        if step == prune_at:
            pruner.prune(0.3)
    for handle in handles:
        handle.remove()
    correction = 1 - decay**steps
    return [(reference[p][0] / correction, reference[p][1] / correction) for p in consumers]


@pytest.mark.parametrize(
    "name", ["llama-mha-untied", "llama-gqa-tied", "qwen2-gqa-bias-tied", "llama-biased"]
)
def test_reconstruction_criterion_costs_follow_the_recorded_moments(name):
    model = biased_llama() if name == "llama-biased" else tiny_model(name, layers=3)
    pruner = LoraPruner(
        model, LoraPruneConfig(ratio=0.5, criterion="reconstruction", layers=(0, 1, 2), lora_dropout=0.0)
    )
    randomize_lora(model)
    model.train()
    reference = recorded_moments(pruner, steps=3, prune_at=1)
    assert pruner.masked_anything()
    pruner.tracker.refresh()
    correction = 1 - pruner.config.ema_decay**3
    for group, scores, (second, mean), (want_second, want_mean) in zip(
        pruner.groups, pruner.tracker.scores, pruner.tracker.moments, reference, strict=True
    ):
        torch.testing.assert_close(second.double() / correction, want_second, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mean.double() / correction, want_mean, rtol=1e-5, atol=1e-6)
        consumer = model.get_submodule(next(m.path for m in group.members if m.axis == "in"))
        covariance = ConsumerStatistics(want_second, want_mean, 1).covariance(
            centred=consumer.bias is not None
        )
        width = consumer.in_features // group.num_units
        want = removal_costs(consumer.merged_weight().double(), covariance, consumer.in_mask, width)
        torch.testing.assert_close(scores.double(), want, rtol=1e-4, atol=1e-6 * float(want.max()))
        keep = pruner.keep[pruner.groups.index(group)]
        assert bool((scores[~keep] == 0).all()) and bool((scores[keep] > 0).all())
    before = [k.clone() for k in pruner.keep]
    pruner.prune(0.5)  # the lowest costs among the kept units go next
    for scores, old, new in zip(pruner.tracker.scores, before, pruner.keep, strict=True):
        removed = old & ~new
        if removed.any() and (old & new).any():
            assert float(scores[removed].max()) <= float(scores[old & new].min())


def test_reconstruction_criterion_state_resumes_to_the_same_costs():
    def trained():
        model = tiny_model("llama-gqa-tied", layers=3)
        pruner = LoraPruner(model, LoraPruneConfig(ratio=0.5, criterion="reconstruction", lora_dropout=0.0))
        randomize_lora(model)
        model.train()
        return pruner

    first = trained()
    recorded_moments(first, steps=2, prune_at=0)
    second = trained()
    second.load_state_dict({k: v.clone() for k, v in first.state_dict().items()})
    first.tracker.refresh()
    second.tracker.refresh()
    for a, b in zip(first.tracker.scores, second.tracker.scores, strict=True):
        assert torch.equal(a, b)
    state = first.state_dict()
    state.pop(f"{first.groups[0].name}.second_moment")
    with pytest.raises(ValueError, match="second_moment is missing"):
        second.load_state_dict(state)
