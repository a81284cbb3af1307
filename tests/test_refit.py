"""The closed-form refit of o_proj and down_proj (``reconstruct``): the solve against a least-squares
reference, the output error it lowers, compaction and saving after it, bad input."""

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
    reconstruct,
    reconstruct_options,
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
