"""LoRAShear's parts in the LoRAPrune loop: the fade (LHSPG) at the layer, through the Triton kernels and
in the loop (exact target at the cool-down, exact zero once faded, the half-space projection); the
knowledge-distribution protection; the staged recovery; resume; compaction refusing a fade in progress."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TRITON_SKIP_REASON
from tiny_models import random_tokens, randomize_lora, tiny_model

from loraprune import LoraPruneConfig, LoraPruner
from loraprune.fade import Fader, fade_options
from loraprune.masks import prune_count
from loraprune.nn import LoraPruneLinear
from loraprune.protect import (
    check_reachable,
    choose_protected,
    heldout_loss,
    heldout_split,
    knowledge_distribution,
    protect_options,
)
from loraprune.recovery import Recovery, RecoverySource
from loraprune.run import PruneSchedule, PruningRun, RunConfig

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


# -- the layer: m·W + s·B·A for the fading features ------------------------------------------------------
def faded_layer(bias: bool = True, seed: int = 0, dtype=torch.float32, device=DEVICE) -> LoraPruneLinear:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(24, 20, generator=generator) * 0.3
    layer = LoraPruneLinear(weight, torch.randn(24, generator=generator) if bias else None, 4, 8.0, 0.0)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(4, 20, generator=generator) * 0.3)
        layer.lora_B.copy_(torch.randn(24, 4, generator=generator) * 0.3)
    return layer.to(device=device, dtype=dtype).train()


def reference(layer: LoraPruneLinear, x: torch.Tensor, out_fade, in_fade) -> torch.Tensor:
    """``((x⊙m_in)·(W⊙scales)ᵀ + b⊙m_rows + s·(x⊙m_in)·Aᵀ·Bᵀ)⊙m_out``: the base of the fading rows
    (with their bias) and columns scaled by ``m``, the LoRA path as it is."""
    row_scale = torch.ones(layer.out_features, dtype=torch.float64, device=x.device)
    col_scale = torch.ones(layer.in_features, dtype=torch.float64, device=x.device)
    if out_fade is not None:
        row_scale[out_fade[0]] = out_fade[1].double()
    if in_fade is not None:
        col_scale[in_fade[0]] = in_fade[1].double()
    xd = x.double() * layer.in_mask.double()
    weight = layer.weight.double() * row_scale[:, None] * col_scale[None, :]
    bias = None if layer.bias is None else layer.bias.double() * row_scale
    lora = layer.scaling * (xd @ layer.lora_A.double().T) @ layer.lora_B.double().T
    return (F.linear(xd, weight, bias) + lora) * layer.out_mask.double()


FADES = {
    "rows": ((torch.tensor([1, 2, 7, 20]), torch.tensor([0.75, 0.75, 0.25, 0.0])), None),
    "columns": (None, (torch.tensor([0, 5, 6, 19]), torch.tensor([0.5, 0.5, 0.1, 0.9]))),
    "both": (
        (torch.tensor([3, 4]), torch.tensor([0.5, 0.5])),
        (torch.tensor([10, 11, 12]), torch.tensor([0.2, 0.2, 0.2])),
    ),
}
BACKENDS = ["torch"] + ([] if TRITON_SKIP_REASON else ["triton"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fade", list(FADES))
@pytest.mark.parametrize("masked", [False, True])
def test_a_fading_layer_computes_m_w_plus_lora_in_value_and_gradients(monkeypatch, backend, fade, masked):
    """Every backend (Triton: the fused kernels, through the interpreter without a GPU) keeps its call and
    the layer takes (1 − m) of the fading features' base off: the reference's value and gradients."""
    monkeypatch.setenv("LORAPRUNE_BACKEND", backend)
    layer = faded_layer()
    if masked:  # masked features elsewhere in the layer (and a masked input column)
        out_mask = torch.ones(24, dtype=torch.bool)
        out_mask[[0, 9, 10, 11]] = False
        in_mask = torch.ones(20, dtype=torch.bool)
        in_mask[[3, 17]] = False
        layer.set_masks(out_mask.to(DEVICE), in_mask.to(DEVICE))
    out_fade, in_fade = FADES[fade]
    layer.set_fade(out=out_fade, in_=in_fade)
    assert layer.fading
    x = torch.randn(2, 5, 20, generator=torch.Generator().manual_seed(3)).to(DEVICE).requires_grad_(True)
    y = layer(x)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    y.backward(grad)
    got = (y.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad)
    xr = x.detach().double().requires_grad_(True)
    ref_layer = copy.deepcopy(layer)
    for param in (ref_layer.lora_A, ref_layer.lora_B):
        param.grad = None
    want_y = reference(ref_layer, xr, out_fade, in_fade)
    want_y.backward(grad.double())
    want = (want_y.detach(), xr.grad, ref_layer.lora_A.grad, ref_layer.lora_B.grad)
    for name, a, b in zip(("y", "x.grad", "A.grad", "B.grad"), got, want, strict=True):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5, msg=name)
    layer.set_fade(None, None)
    assert not layer.fading


def test_a_fading_layer_under_autocast_computes_in_the_autocast_dtype():
    layer = faded_layer(device=torch.device("cpu"))
    out_fade, in_fade = FADES["both"]
    layer.set_fade(out=out_fade, in_=in_fade)
    x = torch.randn(3, 20, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    want = reference(layer, x.detach(), out_fade, in_fade)
    torch.testing.assert_close(y.double(), want, rtol=3e-2, atol=3e-2)


def test_a_quantized_base_fades_by_scaling_its_unfused_forward():
    pytest.importorskip("bitsandbytes")
    from loraprune.quantization import QuantizedLoraPruneLinear

    dense = faded_layer(bias=True, device=torch.device("cpu"))
    quantized = QuantizedLoraPruneLinear.from_module(
        torch.nn.Linear(20, 24).requires_grad_(False), "int8", 4, 8.0, 0.0, torch.float32
    )
    with torch.no_grad():
        quantized.lora_A.copy_(dense.lora_A)
        quantized.lora_B.copy_(dense.lora_B)
        quantized.bias.copy_(dense.bias)
    dense.weight.data = quantized.dequantize_rows(slice(None)).clone()  # the same W, dequantized
    out_fade, in_fade = FADES["both"]
    x = torch.randn(3, 20, generator=torch.Generator().manual_seed(3))
    for layer in (dense, quantized):
        layer.set_fade(out=out_fade, in_=in_fade)
        layer.eval()
    # LLM.int8() rounds the activations too: agreement to its precision
    torch.testing.assert_close(quantized(x), dense(x), rtol=0.05, atol=0.05)
    with pytest.raises(ValueError, match="still fading"):
        quantized.merged_linear()


def test_set_fade_checks_its_input():
    layer = faded_layer(device=torch.device("cpu"))
    with pytest.raises(ValueError, match="outside"):
        layer.set_fade(out=(torch.tensor([24]), torch.tensor([0.5])))
    with pytest.raises(ValueError, match="int64"):
        layer.set_fade(in_=(torch.tensor([1.0]), torch.tensor([0.5])))
    layer.set_fade(out=(torch.tensor([2]), torch.tensor([0.5])))
    with pytest.raises(ValueError, match="still fading"):
        layer.merged_linear()


# -- the schedule --------------------------------------------------------------------------------------
def test_the_fade_compresses_the_selections_so_that_the_last_ends_at_the_cooldown():
    base = PruneSchedule(100, 10, 0.1, 0.1)
    assert base.prune_steps[-1] == base.end == 90
    faded = RunConfig(steps=100, prune_every=10, fade_steps=5).schedule()
    assert faded == PruneSchedule(100, 10, 0.1, 0.1, fade_steps=5) and faded.end == 90
    assert faded.prune_steps == (20, 30, 40, 50, 60, 70, 80, 85)
    assert faded.ratio_after(85, 0.5) == 0.5 and faded.ratio_after(84, 0.5) < 0.5
    assert faded.ratio_after(19, 0.5) == 0.0 and faded.scoring(84) and not faded.scoring(85)
    ratios = [faded.ratio_after(t, 0.5) for t in faded.prune_steps]
    assert ratios == sorted(ratios) and len(set(ratios)) == len(ratios)
    assert RunConfig(steps=100, prune_every=10, fade_steps=79).schedule().prune_steps == (11,)
    with pytest.raises(ValueError, match="fade_steps \\(80\\) must be shorter than the pruning window"):
        RunConfig(steps=100, prune_every=10, fade_steps=80)
    with pytest.raises(ValueError, match="fade_steps \\(5\\) must be fewer than steps"):
        RunConfig(steps=5, prune_every=1, mode="oneshot", fade_steps=5)
    assert fade_options(0, None) is None and fade_options(3, None) == 0.0
    for steps, epsilon, message in ((-1, None, "fade_steps"), (2, 1.0, "fade_epsilon"), (0, 0.1, "needs")):
        with pytest.raises(ValueError, match=message):
            fade_options(steps, epsilon)


# -- the fade in the loop ------------------------------------------------------------------------------
WINDOWS = random_tokens(batch=24, length=10, seed=7)


def make_run(tmp_path=None, steps=10, prune=None, **options) -> PruningRun:
    prune = {"layers": (0, 1, 2), "lora_dropout": 0.0, "ratio": 0.5, **(prune or {})}
    sources = options.pop("recovery_sources", None)
    config = {"steps": steps, "batch_size": 2, "seq_len": 10, "prune_every": 2, "save_every": 0, **options}
    return PruningRun(
        tiny_model(),
        WINDOWS,
        LoraPruneConfig(**prune),
        RunConfig(**config),
        checkpoint=None if tmp_path is None else tmp_path / "ckpt.safetensors",
        progress=False,
        recovery_sources=sources,
    )


@pytest.mark.parametrize(("fade_steps", "epsilon"), [*((n, 0.0) for n in range(1, 8)), (3, 0.9)])
def test_any_fade_that_fits_leaves_exactly_the_target_masked_at_the_cooldown(fade_steps, epsilon):
    run = make_run(fade_steps=fade_steps, fade_epsilon=epsilon)
    end = run.schedule.end
    assert run.schedule.prune_steps[-1] == end - fade_steps  # steps 10, warm-up 1: end 9, fade_steps < 8
    targets = [prune_count(g, 0.5) for g in run.pruner.groups]
    history = []
    while run.step < end:
        run.run(stop_after=1)
        fader = run.fader
        chosen = [int((s >= 0).sum()) for s in fader.start]
        masked = [int((~k).sum()) for k in run.pruner.keep]
        assert all(m <= c for m, c in zip(masked, chosen, strict=True))
        # the masks are the masked units, and the fading ones have their layers' factors
        for i, group in enumerate(run.pruner.groups):
            assert torch.equal(~run.pruner.keep[i], fader.end[i] >= 0)
            for member in group.members:
                assert run.model.get_submodule(member.path).fading == bool(fader.fading(i).any())
        history.append((run.step, chosen, masked))
    assert history[-1][1] == targets and history[-1][2] == targets  # exactly the target, all masked
    assert not run.fader.any_fading() and not run.scoring
    fader = run.fader
    for start, stop, projected in zip(fader.start, fader.end, fader.projected, strict=True):
        chosen = start >= 0
        # a unit not projected fades for exactly fade_steps steps; a projected one is masked sooner
        assert torch.equal(
            stop[chosen & ~projected] - start[chosen & ~projected],
            torch.full_like(start[chosen & ~projected], fade_steps),
        )
        assert bool((stop[projected] - start[projected] < fade_steps).all())
    if epsilon > 0:  # ε close to 1 projects every unit at its first test: ⟨x, x̂⟩ ≈ (m̂/m)·‖x‖², m̂/m = 1/2
        assert all(bool(p[s >= 0].all()) for p, s in zip(fader.projected, fader.start, strict=True))
        assert all(
            bool((e[s >= 0] - s[s >= 0] == 1).all()) for s, e in zip(fader.start, fader.end, strict=True)
        )
    summary = run.run()
    assert summary.finished and math.isfinite(summary.final_loss)
    run.compact()


def test_a_faded_out_unit_contributes_exactly_zero_through_base_and_lora():
    run = make_run(fade_steps=3)
    run.run(stop_after=run.schedule.end)
    assert not run.fader.any_fading()
    model = run.model.eval()
    tokens = random_tokens(batch=2, length=10, seed=11)
    with torch.no_grad():
        before = model(input_ids=tokens).logits
        for group, keep in zip(run.pruner.groups, run.pruner.keep, strict=True):
            for member in group.members:  # rewrite the masked units' W, bias and LoRA rows/columns
                module = model.get_submodule(member.path)
                size = module.out_features if member.axis == "out" else module.in_features
                dead = (~keep).repeat_interleave(size // group.num_units)
                if member.axis == "out":
                    module.weight[dead] = 100.0
                    module.lora_B[dead] = 100.0
                    if module.bias is not None:
                        module.bias[dead] = 100.0
                else:
                    module.weight[:, dead] = 100.0
                    module.lora_A[:, dead] = 100.0
        after = model(input_ids=tokens).logits
    assert torch.equal(before, after)
    model.train()
    model(input_ids=tokens, labels=tokens).loss.backward()
    group, keep = run.pruner.groups[1], run.pruner.keep[1]  # layer 0's MLP: gate/up rows, down columns
    gate = model.get_submodule(group.members[0].path)
    assert gate.lora_B.grad[~keep].abs().max() == 0 and gate.lora_B.grad[keep].abs().max() > 0


def test_a_unit_whose_update_reverses_its_direction_is_projected_onto_zero_at_once():
    model = tiny_model()
    pruner = LoraPruner(
        model, LoraPruneConfig(ratio=0.5, criterion="magnitude", layers=(1,), lora_dropout=0.0)
    )
    randomize_lora(model)
    pruner.update_scores()
    fader = Fader(pruner, fade_steps=4, epsilon=0.0)
    fader.select(0.5, steps_done=10)
    fader.apply(10)
    mlp = 1  # layer 1's MLP group: 20 of 40 channels fading
    chosen = (fader.start[mlp] >= 0).nonzero().squeeze(1)
    assert len(chosen) == 20 and fader.fading(mlp).sum() == 20
    gate = model.get_submodule(pruner.groups[mlp].members[0].path)
    assert gate.fading and torch.equal(gate.fade_out[0], chosen)
    torch.testing.assert_close(gate.fade_out[1], torch.full((20,), 0.75))  # m = 1 − 1/4 for step 11
    # the products against a dense computation: x = m·W + s·B·A over gate/up rows and the down column
    fader.before_update(10)
    reversed_unit = int(chosen[0])
    with torch.no_grad():  # the "optimizer step": LoRA now points the unit against its base
        for member in pruner.groups[mlp].members:
            module = model.get_submodule(member.path)
            if member.axis == "out":
                module.lora_B[reversed_unit] = 0
                module.lora_B[reversed_unit, 0] = 1.0
                module.lora_A[0] = -10 * module.weight[reversed_unit] / module.scaling
            else:
                module.lora_A[:, reversed_unit] = 0
    units = fader._checked[mlp]
    start = fader.start[mlp][units]
    dot, norm = fader._unit_products(mlp, units, fader.factor(start, 10), fader.factor(start, 11))
    want_dot, want_norm = dense_products(
        pruner, fader, mlp, units, fader.factor(start, 10), fader.factor(start, 11)
    )
    torch.testing.assert_close(dot, want_dot, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm, want_norm, rtol=1e-5, atol=1e-6)
    fader.step_done(11)
    assert fader.projected[mlp][reversed_unit] and fader.end[mlp][reversed_unit] == 11
    assert not pruner.keep[mlp][reversed_unit] and int((~pruner.keep[mlp]).sum()) >= 1


def dense_products(pruner, fader, index, units, before, after):
    """⟨x, x̂⟩ and ‖x‖² per unit from the whole matrices (the snapshot's factors and the current ones)."""
    group = pruner.groups[index]
    dot = torch.zeros(len(units), dtype=torch.float64)
    norm = torch.zeros(len(units), dtype=torch.float64)
    for member in group.members:
        module = pruner.model.get_submodule(member.path)
        old_a, old_b = fader._snapshot[member.path]
        x_old = module.weight.double().clone()
        x_new = module.weight.double().clone()
        for k, u in enumerate(units.tolist()):
            rows = slice(u, u + 1)
            if member.axis == "out":
                x_old[rows] *= float(before[k])
                x_new[rows] *= float(after[k])
            else:
                x_old[:, rows] *= float(before[k])
                x_new[:, rows] *= float(after[k])
        x_old += module.scaling * old_b.double() @ old_a.double()
        x_new += module.scaling * module.lora_B.double() @ module.lora_A.double()
        for k, u in enumerate(units.tolist()):
            a, b = (x_old[u], x_new[u]) if member.axis == "out" else (x_old[:, u], x_new[:, u])
            dot[k] += (a * b).sum()
            norm[k] += (a * a).sum()
    return dot, norm


def test_protection_and_fade_with_prunedlora_distillation_and_global_ranking():
    run = make_run(
        steps=12,
        prune={"lora_r": 8, "lora_final_r": 4, "ranking": "global", "lora_dropout": 0.1},
        fade_steps=3,
        protect_fraction=0.34,
        heldout_windows=4,
        distill_weight=0.5,
    )
    run.run()
    assert (
        not run.fader.any_fading()
        and run.pruner.rank.ranks()
        and set(run.pruner.rank.ranks().values()) == {4}
    )
    masked = sum(
        int((~k).sum()) for k, e in zip(run.pruner.keep, run.protection.exempt, strict=True) if not e
    )
    targets = sum(
        prune_count(g, 0.5) for g, e in zip(run.pruner.groups, run.protection.exempt, strict=True) if not e
    )
    assert abs(masked - targets) <= 2  # global ranking: the kind's total, snapped per group
    run.compact()


def test_a_quantized_base_fades_and_its_weight_slices_are_dequantized():
    pytest.importorskip("bitsandbytes")
    from loraprune.fade import _weight_slice

    run = make_run(prune={"quantize_base": "int8", "criterion": "magnitude"}, fade_steps=3)
    module = run.model.get_submodule("model.layers.1.mlp.down_proj")
    features = torch.tensor([0, 5, 39])
    whole = module.dequantize_rows(slice(None))
    torch.testing.assert_close(_weight_slice(module, "in", features), whole[:, features].T)
    torch.testing.assert_close(_weight_slice(module, "out", features), whole[features])
    run.run()
    assert [int((~k).sum()) for k in run.pruner.keep] == [prune_count(g, 0.5) for g in run.pruner.groups]
    run.compact()


def test_compaction_refuses_a_model_whose_fade_is_in_progress():
    run = make_run(fade_steps=4)
    run.run(stop_after=run.schedule.prune_steps[0] + 1)
    assert run.fader.any_fading()
    with pytest.raises(ValueError, match="still fading out"):
        run.compact()
    assert all(
        isinstance(m, LoraPruneLinear)
        for m in [run.model.get_submodule(g.members[0].path) for g in run.pruner.groups]
    )


def test_oneshot_with_a_fade_chooses_after_calibration_and_masks_after_the_fade():
    run = make_run(steps=6, mode="oneshot", calib_batches=2, fade_steps=3)
    run.run(stop_after=2)
    targets = [prune_count(g, 0.5) for g in run.pruner.groups]
    assert [int((s >= 0).sum()) for s in run.fader.start] == targets
    assert (run.fader.start[0] == 0).sum() == targets[0]  # all chosen after the calibration
    assert not run.pruner.tracker.captures  # scoring finished at calibration
    run.run(stop_after=1)
    assert [int((~k).sum()) for k in run.pruner.keep] == targets and not run.fader.any_fading()


# -- protection -----------------------------------------------------------------------------------------
def test_knowledge_distribution_measures_each_removal_and_restores_the_masks():
    model = tiny_model()
    pruner = LoraPruner(model, LoraPruneConfig(ratio=0.5, layers=(0, 2), lora_dropout=0.0))
    windows = random_tokens(batch=5, length=10, seed=3)
    base, by_layer = knowledge_distribution(pruner, windows, "layer", batch_size=2)
    base_unit, by_unit = knowledge_distribution(pruner, windows, "unit", batch_size=2)
    assert base == pytest.approx(base_unit) and all(bool(k.all()) for k in pruner.keep)
    assert [len(v) for v in by_layer] == [1] * 4 and [len(v) for v in by_unit] == [4, 40, 4, 40]
    pruner.set_group_mask(1, torch.arange(40) != 7)  # layer 0's MLP without channel 7
    assert heldout_loss(model, windows, 3) - base == pytest.approx(by_unit[1][7], abs=1e-6)
    pruner.set_group_mask(2, torch.zeros(4, dtype=torch.bool))  # the same loss over micro-batches of 2
    pruner.set_group_mask(1, torch.ones(40, dtype=torch.bool))
    assert heldout_loss(model, windows, 2) - base == pytest.approx(by_layer[2][0], abs=1e-6)


def test_the_most_damaging_fraction_is_protected_per_kind():
    model = tiny_model()
    groups = LoraPruner(model, LoraPruneConfig(layers=(0, 1, 2, 3))).groups  # attention, mlp × 4
    increases = [[0.1], [0.5], [0.9], [0.2], [0.3], [0.3], [0.0], [0.1]]
    protected, exempt = choose_protected(groups, increases, 0.25, "layer")
    assert exempt == [False, True, True, False, False, False, False, False]
    assert protected[1] == list(range(40)) and protected[0] == []
    protected, exempt = choose_protected(groups, increases, 0.5, "layer")
    assert exempt == [False, True, True, False, True, True, False, False]
    unit_increases = [[float(u == 1) for u in range(g.num_units)] for g in groups]
    unit_increases[2] = [2.0, 0.0, 0.0, 0.5]
    protected, exempt = choose_protected(groups, unit_increases, 0.2, "unit")  # 3 of 16 heads, 32 of 160
    assert not any(exempt) and [protected[i] for i in (0, 2, 4, 6)] == [[1], [0], [1], []]
    # the MLP: the four channels 1, then ties at 0 go to the lower layer and channel
    assert protected[1] == list(range(29)) and [protected[i] for i in (3, 5, 7)] == [[1], [1], [1]]


def test_a_protection_that_leaves_a_layer_too_few_units_is_refused():
    groups = LoraPruner(tiny_model(), LoraPruneConfig(layers=(0, 1))).groups
    masks = [torch.zeros(g.num_units, dtype=torch.bool) for g in groups]
    masks[0][:3] = True  # 3 of layer 0's 4 heads: ratio 0.5 masks 2
    with pytest.raises(
        ValueError, match=r"protect_fraction 0.3 protects 3 of the 4 units of layers\.0\.attention"
    ):
        check_reachable(groups, masks, [False] * 4, 0.5, "local", 0.3)
    check_reachable(groups, masks, [False] * 4, 0.5, "global", 0.3)  # layer 1 can lose more heads
    check_reachable(groups, masks, [False] * 4, 0.25, "local", 0.3)
    with pytest.raises(ValueError, match="protects every attention group"):
        check_reachable(groups, masks, [True, False, True, False], 0.5, "local", 0.9)
    assert protect_options(0.0, None) is None and protect_options(0.1, None) == "layer"
    for fraction, by, message in ((1.0, None, "protect_fraction must be in"), (0.0, "unit", "needs")):
        with pytest.raises(ValueError, match=message):
            protect_options(fraction, by)
    train, held = heldout_split(torch.arange(20).view(10, 2), 3, seed=0)
    assert (
        len(train) == 7
        and len(held) == 3
        and set(torch.cat([train, held]).flatten().tolist()) == set(range(20))
    )
    with pytest.raises(ValueError, match="heldout_windows \\(10\\) leaves no training window"):
        heldout_split(torch.arange(20).view(10, 2), 10, seed=0)


def test_a_unit_protection_the_ratio_cannot_reach_fails_in_prepare_before_any_step():
    run = make_run(protect_fraction=0.6, protect_by="unit", heldout_windows=2, prune={"layers": (1,)})
    # 0.6 of one layer's 4 heads is 2 (ratio 0.5 masks the other 2); of its 40 channels, 24: 16 left for 20
    with pytest.raises(
        ValueError, match=r"protect_fraction 0\.6 protects 24 of the 40 units of layers\.1\.mlp"
    ):
        run.prepare()
    assert run.protection is None and run.step == 0 and all(bool(k.all()) for k in run.pruner.keep)


@pytest.mark.parametrize(
    ("by", "ranking", "fraction"),
    [("layer", "local", 0.34), ("unit", "local", 0.1), ("unit", "global", 0.34)],
)
def test_protected_units_and_groups_are_never_pruned(by, ranking, fraction):
    # local ranking, by unit: at most 1 of 12 heads and 12 of 120 channels, so every layer stays reachable
    run = make_run(
        prune={"ranking": ranking, "criterion": "magnitude"},
        protect_fraction=fraction,
        protect_by=by,
        heldout_windows=4,
    )
    run.run()
    protection, pruner = run.protection, run.pruner
    masks = protection.masks(pruner.groups)
    assert all(not bool((m & ~k).any()) for m, k in zip(masks, pruner.keep, strict=True))
    if by == "layer":  # 3 layers: one attention group and one MLP group left whole
        assert sum(protection.exempt) == 2
        assert [bool(k.all()) for k in pruner.keep] == protection.exempt
    else:
        expected = round(fraction * 12) + round(fraction * 120)
        assert not any(protection.exempt) and sum(int(m.sum()) for m in masks) == expected
    if ranking == "local":
        for group, keep, exempt in zip(pruner.groups, pruner.keep, protection.exempt, strict=True):
            assert int((~keep).sum()) == (0 if exempt else prune_count(group, 0.5))
    report = run.method_report()["protect"]
    assert report["by"] == by and len(report["groups"]) == 6 and report["heldout_windows"] == 4
    assert [g["exempt"] for g in report["groups"]] == protection.exempt
    if by == "unit":
        assert [g["protected_units"] for g in report["groups"]] == protection.protected


# -- recovery ------------------------------------------------------------------------------------------
def test_the_recovery_rule_picks_the_largest_deviation_or_drop():
    sources = [
        RecoverySource(n, torch.zeros(4, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long))
        for n in "ab"
    ]
    recovery = Recovery(sources, 2, 0, start=9, end=16, stages=3, rule="drop")
    assert recovery.boundaries == [9, 11, 13] and recovery.stage_at(8) is None and recovery.stage_at(12) == 1
    recovery.dense = [1.0, 2.0]
    assert recovery.due(9) and not recovery.due(8)
    first = recovery.choose(9, [1.5, 2.2])  # deviations 0.5, 0.2: a
    assert not recovery.due(10) and recovery.due(11)
    assert first["source"] == "a" and first["chosen_by"] == "deviation" and first["end_step"] == 11
    second = recovery.choose(11, [1.2, 2.15])  # drops 0.3, 0.05: a again; by deviation (0.2, 0.15) also a
    third = recovery.choose(13, [1.15, 2.0])  # drops 0.05, 0.15: b
    assert (second["source"], third["source"], third["chosen_by"], third["end_step"]) == (
        "a",
        "b",
        "drop",
        16,
    )
    assert recovery.sampler(15) is recovery.samplers[1] and recovery.sampler(10) is recovery.samplers[0]
    with pytest.raises(ValueError, match="recovery_stages \\(8\\) exceeds the 7 optimizer steps"):
        Recovery(sources, 2, 0, start=9, end=16, stages=8, rule="drop")
    with pytest.raises(ValueError, match=r"recovery_data: .* has none"):
        Recovery(sources, 2, 0, start=9, end=9, stages=1, rule="drop")


def test_each_recovery_stage_trains_on_its_chosen_source():
    other = random_tokens(batch=24, length=10, seed=8)
    run = make_run(
        steps=12, cooldown=0.4, recovery_sources={"other": other}, heldout_windows=4, recovery_stages=2
    )
    start = run.schedule.end
    assert run.recovery.boundaries == [start, start + (12 - start) // 2]
    seen = []
    original = run._backward

    def backward(index, length=None, distill=True):
        seen.append((run.step, run.sampler))
        return original(index, length, distill)

    run._backward = backward
    run.run()
    stages = run.recovery.stages
    assert len(stages) == 2 and run.recovery.dense is not None and run.recovery.final is not None
    for step, sampler in seen:
        stage = run.recovery.stage_at(step)
        want = run.main_sampler if stage is None else run.recovery.samplers[stages[stage]["source_index"]]
        assert sampler is want
    for stage in stages:  # the rule: the largest deviation from the unpruned model's held-out loss
        assert stage["source_index"] == max(range(2), key=lambda i: stage["deviation"][i])
    report = run.method_report()["recovery"]
    assert [s["name"] for s in report["sources"]] == ["data", "other"]
    assert [s["train_windows"] for s in report["sources"]] == [20, 20]


def test_recovery_options_need_sources_and_a_cooldown():
    with pytest.raises(ValueError, match="recovery_stages needs recovery sources"):
        make_run(recovery_stages=2)
    with pytest.raises(ValueError, match="heldout_windows needs protect_fraction"):
        make_run(heldout_windows=2)
    with pytest.raises(ValueError, match="recovery_rule must be one of"):
        RunConfig(recovery_rule="best")


# -- resume ----------------------------------------------------------------------------------------------
def test_resume_mid_fade_and_mid_recovery_is_bit_identical(tmp_path):
    options = {
        "steps": 14,
        "cooldown": 0.3,
        "fade_steps": 3,
        "protect_fraction": 0.34,
        "heldout_windows": 4,
        "recovery_sources": {"other": random_tokens(batch=12, length=10, seed=9)},
        "prune": {"lora_dropout": 0.1},
    }
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    whole = make_run(tmp_path / "a", **copy.deepcopy(options))
    whole.run()
    split = make_run(tmp_path / "b", **copy.deepcopy(options))
    split.run(stop_after=5)  # units fading
    assert split.fader.any_fading()
    resumed = make_run(tmp_path / "b", **copy.deepcopy(options))
    resumed.load_checkpoint()
    resumed.run(stop_after=6)  # into the recovery's first stage
    assert resumed.recovery.stages
    again = make_run(tmp_path / "b", **copy.deepcopy(options))
    again.load_checkpoint()
    again.run()
    for a, b in zip(whole.pruner.trainable_parameters(), again.pruner.trainable_parameters(), strict=True):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(whole.pruner.keep, again.pruner.keep, strict=True))
    one, two = whole.method_report(), again.method_report()
    assert one["protect"].pop("wall_time_s") > 0 and two["protect"].pop("wall_time_s") > 0  # measured
    assert one == two and one["recovery"]["final_heldout_loss"] is not None
