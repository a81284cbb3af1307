"""Distillation from the unpruned model (``distill_weight``): the chunked KL, the teacher (masks and
LoRA off), the loss against a reference, resume, PrunedLoRA, one-shot, quantized base, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny_models import random_tokens, randomize_lora, tiny_model

from loraprune import LoraPruneConfig, LoraPruner
from loraprune.checkpoint import pruning_state
from loraprune.distill import Distiller, distill_options, kl_divergence, teacher_hidden_states
from loraprune.run import PruningRun, RunConfig


def test_chunked_kl_equals_the_whole_tensor_reference_in_value_and_gradient():
    generator = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(5, 11, bias=False)
    hidden = torch.randn(2, 7, 5, generator=generator)
    logits = torch.randn(2, 7, 11, generator=generator)
    temperature = 2.0
    student = logits.clone().requires_grad_(True)
    want = F.kl_div(
        F.log_softmax(student / temperature, -1),
        F.log_softmax(head(hidden).detach() / temperature, -1),
        log_target=True,
        reduction="sum",
    ) / (2 * 7)
    want.backward()
    for chunk in (1, 3, 7, 100):  # 7 and 100: one chunk per sequence, unchunked
        chunked = logits.clone().requires_grad_(True)
        got = kl_divergence(chunked, hidden, head, temperature, chunk)
        (got * 3).backward()
        torch.testing.assert_close(got, want.detach())
        torch.testing.assert_close(chunked.grad, 3 * student.grad)
    # the first positions only (the cross-entropy's: all but the last); the rest get no gradient
    partial = logits.clone().requires_grad_(True)
    got = kl_divergence(partial, hidden, head, temperature, 2, positions=6)
    got.backward()
    want = F.kl_div(
        F.log_softmax(logits[:, :6] / temperature, -1),
        F.log_softmax(head(hidden[:, :6]).detach() / temperature, -1),
        log_target=True,
        reduction="sum",
    ) / (2 * 6)
    torch.testing.assert_close(got, want)
    assert partial.grad[:, 6].abs().max() == 0 and partial.grad[:, :6].abs().max() > 0


def patched(model: torch.nn.Module, **options) -> LoraPruner:
    """``model`` patched and masked by magnitude, LoRA non-zero, in training mode."""
    pruner = LoraPruner(model, LoraPruneConfig(ratio=0.5, criterion="magnitude", **options))
    randomize_lora(model)
    pruner.update_scores()
    pruner.prune()
    model.train()
    return pruner


def test_the_teacher_is_the_dense_base_with_masks_and_lora_off():
    model = tiny_model("llama-gqa-tied", layers=3)
    dense = copy.deepcopy(model)
    patched(model)
    tokens = random_tokens(batch=2, length=12)
    modes = [m.training for m in model.modules()]
    with torch.no_grad():
        teacher = model.lm_head(teacher_hidden_states(model, tokens))
        want = dense(input_ids=tokens).logits
        student = model.eval()(input_ids=tokens).logits
    torch.testing.assert_close(teacher, want)
    assert not torch.allclose(student, want, atol=1e-2)  # the masks and LoRA are on again after
    model.train()
    assert [m.training for m in model.modules()] == modes


def test_the_loss_is_the_weighted_cross_entropy_and_kl_to_the_dense_model():
    model = tiny_model("llama-mha-untied", layers=3)
    dense = copy.deepcopy(model)
    pruner = LoraPruner(model, LoraPruneConfig(ratio=0.5, criterion="magnitude", lora_dropout=0.0))
    distiller = Distiller(model, 0.3, 2.0)  # LoRA is zero here; it trains below
    randomize_lora(model)
    pruner.update_scores()
    pruner.prune()
    tokens = random_tokens(batch=3, length=10)
    total, cross_entropy = distiller.loss(model, tokens)
    output = model(input_ids=tokens, labels=tokens)
    with torch.no_grad():
        teacher = dense(input_ids=tokens).logits[:, :-1]
    kl = F.kl_div(
        F.log_softmax(output.logits[:, :-1] / 2.0, -1),
        F.log_softmax(teacher / 2.0, -1),
        log_target=True,
        reduction="sum",
    ) / (3 * 9)
    torch.testing.assert_close(cross_entropy, output.loss)
    torch.testing.assert_close(total, 0.7 * output.loss + 0.3 * 4.0 * kl)
    total.backward()
    assert all(p.grad is not None for p in pruner.trainable_parameters())


def make_run(tmp_path, steps=6, **options) -> PruningRun:
    prune = {k: options.pop(k) for k in list(options) if k in LoraPruneConfig.__dataclass_fields__}
    return PruningRun(
        tiny_model(),
        random_tokens(batch=16, length=10, seed=7),
        LoraPruneConfig(**{"lora_dropout": 0.1, **prune}),
        RunConfig(steps=steps, batch_size=2, seq_len=10, prune_every=2, save_every=0, **options),
        checkpoint=tmp_path / "ckpt.safetensors",
        progress=False,
    )


def test_resume_with_distillation_is_bit_identical(tmp_path):
    whole = make_run(tmp_path / "a", distill_weight=0.5, distill_temperature=2.0)
    (tmp_path / "a").mkdir()
    whole.run()
    (tmp_path / "b").mkdir()
    first = make_run(tmp_path / "b", distill_weight=0.5, distill_temperature=2.0)
    first.run(stop_after=3)
    resumed = make_run(tmp_path / "b", distill_weight=0.5, distill_temperature=2.0)
    resumed.load_checkpoint()
    resumed.run()
    assert resumed.last_loss == whole.last_loss
    a, b = pruning_state(whole.pruner), pruning_state(resumed.pruner)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    plain = make_run(tmp_path / "a")  # distillation changes the training
    plain.run()
    key = "lora.model.layers.1.mlp.up_proj.lora_B"
    assert not torch.equal(pruning_state(plain.pruner)[key], a[key])


@pytest.mark.parametrize(
    "options",
    [{"lora_r": 8, "lora_final_r": 4}, {"mode": "oneshot", "calib_batches": 2}],
    ids=["prunedlora", "oneshot"],
)
def test_distillation_runs_with_prunedlora_and_oneshot(tmp_path, options):
    run = make_run(tmp_path, distill_weight=0.5, **options)
    summary = run.run()
    assert summary.finished and torch.isfinite(torch.tensor(summary.final_loss))
    assert run.pruner.masked_anything()


def test_distillation_with_a_quantized_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    run = make_run(tmp_path, steps=4, distill_weight=0.5, quantize_base="int8")
    with torch.no_grad():  # the teacher is the quantized base itself
        tokens = random_tokens(batch=2, length=10)
        module = run.model.get_submodule("model.layers.1.mlp.down_proj")
        module.base_only = True
        x = torch.randn(3, module.in_features)
        torch.testing.assert_close(module(x), module.base(x))
        module.base_only = False
    summary = run.run()
    assert summary.finished and torch.isfinite(torch.tensor(summary.final_loss))
    assert teacher_hidden_states(run.model, tokens).shape == (2, 10, run.model.config.hidden_size)


def test_bad_distillation_settings_are_one_clear_error(tmp_path):
    assert distill_options(0.0, None) is None and distill_options(0.5, None) == 1.0
    for weight, temperature, name in (
        (1.5, None, "distill_weight"),
        (-0.1, None, "distill_weight"),
        (0.5, 0.0, "distill_temperature"),
        (0.0, 2.0, "distill_temperature needs distill_weight"),
    ):
        with pytest.raises(ValueError, match=name):
            distill_options(weight, temperature)
    model = tiny_model()
    LoraPruner(model, LoraPruneConfig())
    randomize_lora(model)  # a trained adapter taken over: LoRA off would not be this model
    with pytest.raises(ValueError, match="distill_weight: the teacher is the frozen base with LoRA off"):
        PruningRun(
            model,
            random_tokens(batch=8, length=10),
            LoraPruneConfig(),
            RunConfig(steps=4, batch_size=2, seq_len=10, prune_every=2, distill_weight=0.5),
            progress=False,
        )
