"""Importance criteria without weight gradients: fused taylor, act; --squared; their errors (issue 10)."""

from __future__ import annotations

import pytest
import torch
from conftest import requires_triton_interpreter
from tiny_models import random_tokens, randomize_lora, tiny_model

from loraprune import LoraPruneConfig, LoraPruner
from loraprune.cli import main as cli_main
from loraprune.importance import ImportanceTracker
from loraprune.nn import lora_modules
from loraprune.structures import Member, StructureGroup

MODELS = ["llama-mha-untied", "llama-gqa-tied", "qwen2-gqa-bias-tied"]


def make_pruner(name: str, **overrides) -> LoraPruner:
    overrides.setdefault("lora_dropout", 0.0)
    overrides.setdefault("layers", (0, 1, 2))
    pruner = LoraPruner(tiny_model(name), LoraPruneConfig(**overrides))
    randomize_lora(pruner.model)
    pruner.model.train()
    return pruner


def backward(pruner: LoraPruner, seed: int, batch: int = 2, divide: int = 1) -> None:
    tokens = random_tokens(batch=batch, seed=seed)
    (pruner.model(input_ids=tokens, labels=tokens).loss / divide).backward()


def scored(name: str, steps: int = 3, prune_at: int = 1, **overrides) -> LoraPruner:
    """Scores over ``steps`` backward passes, masks grown to 30% after step ``prune_at``."""
    pruner = make_pruner(name, **overrides)
    for step in range(steps):
        backward(pruner, step)
        pruner.update_scores()
        pruner.model.zero_grad()
        if step == prune_at:
            pruner.prune(0.3)
    return pruner


def assert_same_scores(a: LoraPruner, b: LoraPruner, rtol: float = 1e-5) -> None:
    for x, y, group in zip(a.tracker.scores, b.tracker.scores, a.groups, strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=rtol * float(y.abs().max()), msg=group.name)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("squared", [False, True])
def test_fused_taylor_equals_materialized_with_masks(name, squared):
    fused = scored(name, criterion="taylor", taylor_impl="fused", squared=squared)
    materialized = scored(name, criterion="taylor", taylor_impl="materialized", squared=squared)
    assert fused.masked_anything()
    assert_same_scores(fused, materialized)
    assert all(torch.equal(k, m) for k, m in zip(fused.keep, materialized.keep, strict=True))
    fused.prune(0.5)
    materialized.prune(0.5)
    assert all(torch.equal(k, m) for k, m in zip(fused.keep, materialized.keep, strict=True))


def test_fused_taylor_never_asks_for_weight_gradients():
    pruner = make_pruner("llama-gqa-tied", criterion="taylor")
    frozen = [p for n, p in pruner.model.named_parameters() if "lora_" not in n]
    assert not any(p.requires_grad for p in frozen)
    backward(pruner, 0)
    assert all(p.grad is None for p in frozen)
    pruner.update_scores()
    assert not any(p.requires_grad for p in frozen)
    materialized = make_pruner("llama-gqa-tied", criterion="taylor", taylor_impl="materialized")
    q_proj = materialized.model.get_submodule("model.layers.0.self_attn.q_proj")
    assert q_proj.weight.requires_grad  # the comparison path still forms the gradient


@pytest.mark.parametrize("criterion", ["taylor", "act"])
def test_capture_is_off_in_eval_without_grad_and_after_finish_scoring(criterion):
    pruner = make_pruner("llama-mha-untied", criterion=criterion)
    captures = list(pruner.tracker.captures.values())
    tokens = random_tokens()
    pruner.model.eval()
    pruner.model(input_ids=tokens, labels=tokens).loss.backward()  # eval mode: not a scoring pass
    with torch.no_grad():
        pruner.model.train()
        pruner.model(input_ids=tokens)
    assert all(c.backwards == 0 for c in captures)
    with pytest.raises(RuntimeError, match="no backward pass reached"):
        pruner.update_scores()
    backward(pruner, 1)
    pruner.update_scores()
    pruner.finish_scoring()
    assert all(m.score_capture is None for m in lora_modules(pruner.model).values())
    backward(pruner, 2)
    assert all(c.backwards == 0 and not c.buffer.any() for c in captures)


def take_all(pruner: LoraPruner) -> dict[str, torch.Tensor]:
    return {path: capture.take() for path, capture in pruner.tracker.captures.items()}


@pytest.mark.parametrize("criterion", ["taylor", "act"])
def test_gradient_accumulation_semantics(criterion):
    """taylor fused sums the micro-batches' |·|; act takes |·| of the step's sum (the whole batch)."""
    pruner = make_pruner("llama-gqa-tied", criterion=criterion)
    backward(pruner, 10, divide=2)
    first = {path: c.buffer.clone() for path, c in pruner.tracker.captures.items()}
    take_all(pruner)
    backward(pruner, 11, divide=2)
    second = {path: c.buffer.clone() for path, c in pruner.tracker.captures.items()}
    take_all(pruner)
    backward(pruner, 10, divide=2)
    backward(pruner, 11, divide=2)
    both = take_all(pruner)
    for path, value in both.items():
        expected = first[path] + second[path]
        expected = expected if criterion == "taylor" else expected.abs()
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-7)
    if criterion == "act":  # and it is not the sum of the micro-batches' |·|
        assert any(not torch.allclose(both[p], first[p].abs() + second[p].abs(), rtol=1e-3) for p in both)


def unit_mask_gradients(name: str, per_sequence: bool) -> list[torch.Tensor]:
    """Brute force: ∂L/∂m for a multiplier m on each unit's slice of the o_proj / down_proj input."""
    pruner = make_pruner(name, criterion="magnitude")  # no hooks of its own
    multipliers, handles = [], []
    batch = 2
    for group in pruner.groups:
        member = next(m for m in group.members if m.axis == "in")
        module = pruner.model.get_submodule(member.path)
        shape = (batch if per_sequence else 1, 1, group.num_units, 1)
        multiplier = torch.ones(shape, requires_grad=True)
        multipliers.append(multiplier)

        def scale(_module, args, multiplier=multiplier, units=group.num_units):
            (x,) = args
            return ((x.unflatten(-1, (units, -1)) * multiplier).flatten(-2),)

        handles.append(module.register_forward_pre_hook(scale))
    backward(pruner, 0, batch=batch)
    for handle in handles:
        handle.remove()
    if per_sequence:
        return [m.grad.reshape(batch, -1).square().sum(dim=0) for m in multipliers]
    return [m.grad.reshape(-1).abs() for m in multipliers]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("squared", [False, True])
def test_act_matches_autograd_brute_force(name, squared):
    pruner = make_pruner(name, criterion="act", squared=squared, ema_decay=0.0)
    backward(pruner, 0)
    pruner.update_scores()  # λ = 0: scores = this step's importance
    expected = unit_mask_gradients(name, per_sequence=squared)
    for scores, reference, group in zip(pruner.tracker.scores, expected, pruner.groups, strict=True):
        torch.testing.assert_close(scores, reference, rtol=1e-4, atol=1e-9, msg=group.name)


@pytest.mark.parametrize("gqa_unit", ["kv_group", "q_head"])
def test_act_global_ranking_compares_layers_in_loss_units(gqa_unit):
    pruner = scored(
        "llama-gqa-tied", steps=2, prune_at=-1, criterion="act", ranking="global", gqa_unit=gqa_unit
    )
    pruner.prune(0.5)
    kept = {s.name: (s.kept, s.total) for s in pruner.status()}
    mlp = [kept[g.name] for g in pruner.groups if g.kind == "mlp"]
    assert sum(total - k for k, total in mlp) == sum(round(0.5 * total) for _, total in mlp)
    # the lowest raw scores across layers went first
    scores = torch.cat(
        [s for s, g in zip(pruner.tracker.scores, pruner.groups, strict=True) if g.kind == "mlp"]
    )
    keeps = torch.cat([k for k, g in zip(pruner.keep, pruner.groups, strict=True) if g.kind == "mlp"])
    assert scores[~keeps].max() <= scores[keeps].min()


def scored_under_autocast(taylor_impl: str) -> LoraPruner:
    pruner = make_pruner("llama-mha-untied", criterion="taylor", taylor_impl=taylor_impl)
    for step in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tokens = random_tokens(seed=step)
            loss = pruner.model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        pruner.update_scores()
        pruner.model.zero_grad()
    return pruner


def test_fused_taylor_under_autocast_agrees_with_materialized():
    # Both see the same bf16 activations; the fused op reduces dYᵀX in fp32, autograd's weight
    # gradient is rounded to bf16 first: measured ≤ 4e-4 of the largest score apart.
    assert_same_scores(scored_under_autocast("fused"), scored_under_autocast("materialized"), rtol=2e-3)


@requires_triton_interpreter
def test_fused_taylor_through_the_triton_masked_linear(monkeypatch):
    reference = scored("llama-gqa-tied", steps=2, prune_at=0, criterion="taylor", layers=(1,))
    monkeypatch.setenv("LORAPRUNE_BACKEND", "triton")  # the fused masked LoRA linear (interpreted)
    pruner = scored("llama-gqa-tied", steps=2, prune_at=0, criterion="taylor", layers=(1,))
    assert_same_scores(pruner, reference, rtol=1e-3)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="criterion must be one of"):
        LoraPruneConfig(criterion="fisher")
    with pytest.raises(ValueError, match="taylor_impl must be one of"):
        LoraPruneConfig(criterion="taylor", taylor_impl="dense")
    for criterion in ("random", "magnitude"):
        with pytest.raises(ValueError, match=f"squared has no meaning for criterion '{criterion}'"):
            LoraPruneConfig(criterion=criterion, squared=True)
    pruner = make_pruner("llama-mha-untied", criterion="lora")
    group = pruner.groups[0]
    rows_only = StructureGroup(
        group.layer, group.kind, group.num_units, tuple(m for m in group.members if m.axis == "out")
    )
    with pytest.raises(ValueError, match=r"criterion 'act' needs the input of layers\.0\.attention's o_proj"):
        ImportanceTracker(pruner.model, [rows_only], LoraPruneConfig(criterion="act"))
    assert isinstance(rows_only.members[0], Member)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--criterion", "random", "--squared"], "--squared has no meaning for criterion 'random'"),
        (["--criterion", "fisher"], "--criterion: invalid choice"),
        (["--taylor-impl", "dense"], "--taylor-impl: invalid choice"),
        # given explicitly, even at their defaults, with a criterion they do not apply to
        (
            ["--criterion", "lora", "--taylor-impl", "fused"],
            "--taylor-impl applies to criterion 'taylor' only",
        ),
        (
            ["--lora-members", "all"],
            "--lora-members applies to criterion 'lora' only, got criterion 'act'",
        ),
    ],
)
def test_cli_rejects_bad_criteria_in_one_line(flags, message, tmp_path, capsys, tiny_llama_dir):
    out = tmp_path / "out"
    text = tmp_path / "calib.txt"
    text.write_text("hello world " * 50)
    code = cli_main(
        [
            "prune",
            str(tiny_llama_dir),
            "--data",
            str(text),
            "--ratio",
            "0.5",
            "--steps",
            "2",
            "--out",
            str(out),
            *flags,
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert message in err[-1]
    assert not out.exists()


def test_lora_rows_scores_from_the_row_members_only():
    rows = scored("llama-gqa-tied", steps=2, prune_at=-1, criterion="lora", lora_members="rows")
    pruner = make_pruner("llama-gqa-tied", criterion="lora")
    row_groups = [
        StructureGroup(g.layer, g.kind, g.num_units, tuple(m for m in g.members if m.axis == "out"))
        for g in pruner.groups
    ]
    pruner.tracker = ImportanceTracker(pruner.model, row_groups, pruner.config)
    for step in range(2):
        backward(pruner, step)
        pruner.update_scores()
        pruner.model.zero_grad()
    assert_same_scores(rows, pruner)
    with pytest.raises(ValueError, match="lora_members applies to criterion 'lora' only"):
        LoraPruneConfig(criterion="taylor", lora_members="rows")
