"""Patching, importance, masks, compaction and save/load on real model classes."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import CONFIGS, random_tokens, randomize_lora, tiny_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import loraprune
from loraprune import LoraPruneConfig, LoraPruneLinear, LoraPruner, compact, patch_model, unpatch_model
from loraprune.masks import prune_count
from loraprune.nn import lora_modules
from loraprune.structures import head_dim

CONFIG_NAMES = list(CONFIGS)


def trained_pruner(model, steps: int = 2, **overrides) -> LoraPruner:
    """A pruner whose scores saw ``steps`` backward passes (no optimizer: scores only)."""
    overrides.setdefault("lora_dropout", 0.0)
    overrides.setdefault("layers", (0, 1, 2))
    # assert_logits_close's bound was measured on taylor's units: with random LoRA factors these models
    # move their logits by ~5e-4 when every weight moves by one ulp, and which units go changes the rounding
    overrides.setdefault("criterion", "taylor")
    pruner = LoraPruner(model, LoraPruneConfig(**overrides))
    randomize_lora(pruner.model)
    for step in range(steps):
        tokens = random_tokens(seed=step)
        pruner.model(input_ids=tokens, labels=tokens).loss.backward()
        pruner.update_scores()
        pruner.model.zero_grad()
    return pruner


def logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits


def assert_logits_close(a, b):
    scale = a.abs().max()
    assert (a - b).abs().max() <= 1e-4 * scale, (
        f"max diff {(a - b).abs().max():.3g} at logit scale {scale:.3g}"
    )


def test_patch_model_swaps_projections_freezes_base_and_starts_as_identity():
    model = tiny_model()
    tokens = random_tokens()
    before = logits(model, tokens)
    patched = patch_model(model, LoraPruneConfig(target_modules=("q_proj", "v_proj")))
    modules = lora_modules(patched)
    assert len(modules) == 7 * 4
    assert {p for p in modules if modules[p].r} == {p for p in modules if p.endswith(("q_proj", "v_proj"))}
    trainable = [n for n, p in patched.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    torch.testing.assert_close(logits(patched, tokens), before, rtol=0, atol=1e-5)  # B = 0 at start
    assert patch_model(patched) is patched and len(lora_modules(patched)) == 28  # idempotent
    assert [n for n, p in patched.named_parameters() if p.requires_grad] == trainable


def test_lora_initialisation_follows_the_seed():
    a = patch_model(tiny_model(), LoraPruneConfig(seed=3))
    b = patch_model(tiny_model(), LoraPruneConfig(seed=3))
    path = "model.layers.0.self_attn.q_proj"
    assert torch.equal(a.get_submodule(path).lora_A, b.get_submodule(path).lora_A)


@pytest.mark.parametrize("name", CONFIG_NAMES)
@pytest.mark.parametrize("kind", ["attention", "mlp"])
def test_masked_structure_contributes_exactly_zero(name, kind):
    pruner = trained_pruner(tiny_model(name), steps=1)
    index = next(i for i, g in enumerate(pruner.groups) if g.kind == kind and g.layer == 1)
    group = pruner.groups[index]
    keep = torch.ones(group.num_units, dtype=torch.bool)
    keep[1] = False
    pruner.set_group_mask(index, keep)
    pruner.model.eval()
    tokens = random_tokens()
    reference = logits(pruner.model, tokens)
    with torch.no_grad():  # scribble over everything the masked unit owns, in base and LoRA paths
        for member in group.members:
            module = pruner.model.get_submodule(member.path)
            width = (module.out_features if member.axis == "out" else module.in_features) // group.num_units
            owned = slice(width, 2 * width)
            if member.axis == "out":
                module.weight[owned] = 1e3
                if module.bias is not None:
                    module.bias[owned] = 1e3
                if module.lora_B is not None:
                    module.lora_B[owned] = 1e3
            else:
                module.weight[:, owned] = 1e3
                if module.lora_A is not None:
                    module.lora_A[:, owned] = 1e3
    assert torch.equal(logits(pruner.model, tokens), reference)


@pytest.mark.parametrize("name", CONFIG_NAMES)
@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.7])
def test_final_ratio_is_exact(name, ratio):
    pruner = trained_pruner(tiny_model(name), steps=1, gqa_unit="q_head")
    pruner.prune(ratio / 2)
    pruner.prune(ratio)
    for group, status in zip(pruner.groups, pruner.status(), strict=True):
        assert status.total - status.kept == prune_count(group, ratio)
    dense, kept = pruner.parameter_counts()
    assert kept < dense or ratio == 0


def test_a_ratio_the_per_layer_counts_cannot_reach_is_named():
    # SmolLM2's shape: 3 KV groups a layer, so 0.5 masks 2 of 3 (67% of attention), not half.
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=48,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=3,
    )
    pruner = LoraPruner(LlamaForCausalLM(config), LoraPruneConfig(ratio=0.5, layers=(0, 1)))
    assert pruner.masked_fractions() == {"attention": 0.0, "mlp": 0.0}
    assert pruner.masked_fractions(0.5) == {"attention": pytest.approx(2 / 3), "mlp": 0.5}
    (note,) = pruner.unreachable_ratio_notes()
    assert note.startswith("ratio 0.5 masks 66.7% of the attention units: each pruned layer loses 2 of 3")
    assert LoraPruner(tiny_model(), LoraPruneConfig(ratio=0.5)).unreachable_ratio_notes() == []


def test_tiny_llama_half_ratio_keeps_half_the_heads_and_channels(tiny_llama_dir):
    model = loraprune.load_model(tiny_llama_dir)
    pruner = LoraPruner(model, LoraPruneConfig(ratio=0.5, criterion="magnitude"))
    pruner.update_scores()
    pruner.prune()
    assert [(s.kept, s.total) for s in pruner.status()] == [(3, 6), (512, 1024)] * 5  # layers 0-4; 5 is last


@pytest.mark.parametrize("name", CONFIG_NAMES)
@pytest.mark.parametrize(
    ("gqa_unit", "ranking"), [("kv_group", "local"), ("q_head", "local"), ("kv_group", "global")]
)
def test_compacted_logits_equal_masked_logits(name, gqa_unit, ranking):
    pruner = trained_pruner(tiny_model(name), gqa_unit=gqa_unit, ranking=ranking)
    pruner.prune(0.5)
    pruner.model.eval()
    tokens = random_tokens(length=16)
    masked = logits(pruner.model, tokens)
    dense, kept = pruner.parameter_counts()
    model = pruner.compact()
    assert not lora_modules(model) and type(model).__name__.startswith("Pruned")
    assert sum(p.numel() for p in model.parameters()) == kept < dense
    assert_logits_close(logits(model, tokens), masked)


def test_compaction_in_bf16_is_no_less_accurate_than_the_masked_model():
    """Merging rounds once; the masked bf16 model rounds base and LoRA paths apart. Measured
    against the fp32 masked model, the compacted bf16 model must not be worse."""
    pruner = trained_pruner(tiny_model("llama-gqa-tied"))
    pruner.prune(0.5)
    pruner.model.eval()
    tokens = random_tokens()
    exact = logits(pruner.model, tokens)
    pruner.model.to(torch.bfloat16)
    masked_error = (logits(pruner.model, tokens).float() - exact).abs().max()
    model = pruner.compact()
    assert model.get_submodule("model.layers.1.mlp.up_proj").weight.dtype == torch.bfloat16
    compacted_error = (logits(model, tokens).float() - exact).abs().max()
    assert compacted_error <= 1.25 * masked_error


def test_compaction_rejects_inconsistent_masks():
    model = patch_model(tiny_model())
    q_proj = model.get_submodule("model.layers.1.self_attn.q_proj")
    width = head_dim(model)
    mask = torch.ones(q_proj.out_features, dtype=torch.bool)
    mask[:width] = False  # one head masked in q but not in o_proj: not a removable structure
    q_proj.set_masks(out_mask=mask)
    with pytest.raises(ValueError, match="disagree"):
        compact(model)
    mask[: width // 2] = True  # half a head
    q_proj.set_masks(out_mask=mask)
    with pytest.raises(ValueError, match="part of a unit"):
        compact(model)


def test_unpatch_model_merges_lora_and_keeps_masks():
    pruner = trained_pruner(tiny_model("qwen2-gqa-bias-tied"))
    pruner.prune(0.5)
    pruner.model.eval()
    tokens = random_tokens()
    masked = logits(pruner.model, tokens)
    model = unpatch_model(pruner.model)
    assert not lora_modules(model)
    assert_logits_close(logits(model, tokens), masked)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_save_load_is_bit_exact_with_per_layer_widths(name, tmp_path):
    pruner = trained_pruner(tiny_model(name), ranking="global")
    pruner.prune(0.5)
    model = pruner.compact().eval()
    widths = {m.out_features for p, m in model.named_modules() if p.endswith("mlp.gate_proj")}
    assert len(widths) > 1, "global ranking should give layers different widths"
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in files and not {f for f in files if f.endswith((".bin", ".pt", ".pkl"))}
    plan = json.loads((tmp_path / "config.json").read_text())["pruned_layers"]
    assert [entry["intermediate_size"] for entry in plan] == [
        model.get_submodule(f"model.layers.{i}.mlp.gate_proj").out_features for i in range(len(plan))
    ]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    tokens = random_tokens()
    assert torch.equal(logits(loaded, tokens), logits(model, tokens))
    prompt = tokens[:1, :5]
    generated = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(loaded.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0), generated)


def test_pruning_a_pruned_checkpoint_composes_the_plan(tmp_path):
    pruner = trained_pruner(tiny_model("llama-mha-untied"))
    pruner.prune(0.25)
    first = pruner.compact()
    first.save_pretrained(tmp_path)
    first_plan = first.config.pruned_layers
    again = trained_pruner(AutoModelForCausalLM.from_pretrained(tmp_path))
    again.prune(0.5)
    second_plan = again.compact().config.pruned_layers
    for before, after in zip(first_plan, second_plan, strict=True):
        assert set(after["kept_channels"]) <= set(before["kept_channels"])
        assert after["intermediate_size"] <= before["intermediate_size"]


@pytest.mark.parametrize("criterion", ["taylor", "magnitude", "random"])
def test_baseline_criteria_produce_scores(criterion):
    pruner = trained_pruner(tiny_model("llama-gqa-tied"), criterion=criterion)
    assert all(torch.isfinite(s).all() and s.abs().sum() > 0 for s in pruner.tracker.scores)
    weights_grad = pruner.model.get_submodule("model.layers.0.self_attn.q_proj").weight.requires_grad
    assert weights_grad is False  # taylor is fused by default: no weight gradient (tests/test_criteria.py)
    pruner.prune(0.5)


def test_random_criterion_is_seeded():
    a = trained_pruner(tiny_model(), criterion="random", seed=5)
    b = trained_pruner(tiny_model(), criterion="random", seed=5)
    c = trained_pruner(tiny_model(), criterion="random", seed=6)
    assert all(torch.equal(x, y) for x, y in zip(a.tracker.scores, b.tracker.scores, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a.tracker.scores, c.tracker.scores, strict=True))


def authors_sensitivity(pruner: LoraPruner, group) -> torch.Tensor:
    """``compute_sensitivity`` of the authors' code (aim-uofa/LoRAPrune, loraprune/utils.py) added over
    the group's members: ``|G ⊙ W'|`` summed into units (o/down transposed), then L2-normalised."""
    total = torch.zeros(group.num_units)
    for member in group.members:
        module: LoraPruneLinear = pruner.model.get_submodule(member.path)
        a, b, ga, gb = module.lora_A, module.lora_B, module.lora_A.grad, module.lora_B.grad
        element = ((gb @ a + b @ ga - gb @ ga) * (module.weight + module.scaling * b @ a)).abs()
        if member.axis == "in":
            element = element.t()
        per_unit = element.reshape(group.num_units, -1).sum(dim=1)
        total += per_unit / per_unit.norm()
    return total


@pytest.mark.parametrize("name", ["llama-mha-untied", "llama-gqa-tied"])
def test_lora_scores_follow_the_authors_code(name):
    """Units first, then the norm; the moving average starts from zero (update_sensitivity_dict)."""
    pruner = trained_pruner(tiny_model(name), steps=0, criterion="lora")
    expected = [torch.zeros(g.num_units) for g in pruner.groups]
    for seed in range(2):
        tokens = random_tokens(seed=seed)
        pruner.model(input_ids=tokens, labels=tokens).loss.backward()
        with torch.no_grad():
            now = [authors_sensitivity(pruner, g) for g in pruner.groups]
            expected = [0.9 * e + 0.1 * n for e, n in zip(expected, now, strict=True)]
        pruner.update_scores()
        pruner.model.zero_grad()
    for scores, reference, group in zip(pruner.tracker.scores, expected, pruner.groups, strict=True):
        torch.testing.assert_close(scores, reference, msg=group.name)


def test_a_step_with_nan_in_any_group_is_skipped_in_every_group():
    pruner = trained_pruner(tiny_model(), steps=1, criterion="lora")
    before = [s.clone() for s in pruner.tracker.scores]
    tokens = random_tokens(seed=5)
    pruner.model(input_ids=tokens, labels=tokens).loss.backward()
    pruner.model.get_submodule("model.layers.2.mlp.up_proj").lora_A.grad[0, 0] = float("nan")
    pruner.update_scores()
    assert all(torch.equal(s, b) for s, b in zip(pruner.tracker.scores, before, strict=True))
    assert [int(c) for c in pruner.tracker.num_updates] == [1] * len(pruner.groups)
    assert pruner.tracker.total_skipped() == 1  # one step skipped


def test_peft_adapters_give_the_same_scores_as_native_lora():
    peft = pytest.importorskip("peft")
    tokens = random_tokens(seed=4)
    native = trained_pruner(tiny_model("llama-gqa-tied"), steps=0, criterion="act")  # the default
    peft_model = peft.get_peft_model(
        tiny_model("llama-gqa-tied"),
        peft.LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(loraprune.config.ALL_PROJECTIONS)
        ),
    )
    native_modules = lora_modules(native.model)
    with torch.no_grad():
        for path, module in peft_model.get_base_model().named_modules():
            if hasattr(module, "lora_A") and path in native_modules:
                module.lora_A["default"].weight.copy_(native_modules[path].lora_A)
                module.lora_B["default"].weight.copy_(native_modules[path].lora_B)
    adopted = LoraPruner(peft_model, LoraPruneConfig(criterion="act", lora_dropout=0.0, layers=(0, 1, 2)))
    for pruner in (native, adopted):
        pruner.model(input_ids=tokens, labels=tokens).loss.backward()
        pruner.update_scores()
    for mine, theirs in zip(native.tracker.scores, adopted.tracker.scores, strict=True):
        torch.testing.assert_close(mine, theirs)
    assert adopted.model.get_submodule("model.layers.0.mlp.up_proj").scaling == 2.0


def test_pruner_state_round_trip():
    pruner = trained_pruner(tiny_model())
    pruner.prune(0.5)
    state = {k: v.clone() for k, v in pruner.state_dict().items()}
    other = trained_pruner(tiny_model(), steps=0)
    other.load_state_dict(state)
    assert [s.kept for s in other.status()] == [s.kept for s in pruner.status()]
    assert all(torch.equal(x, y) for x, y in zip(other.tracker.scores, pruner.tracker.scores, strict=True))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"ratio": 1.0}, "ratio"),
        ({"ratio": -0.1}, "ratio"),
        ({"lora_r": 0}, "lora_r"),
        ({"lora_r": -2}, "lora_r"),
        ({"criterion": "l1"}, "criterion"),
        ({"round_to": 0}, "round_to"),
        ({"target_modules": ("lm_head",)}, "target_modules"),
    ],
)
def test_config_rejects_bad_values_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LoraPruneConfig(**kwargs)


def test_bad_input_raises_clear_errors(tmp_path):
    pruner = trained_pruner(tiny_model(), steps=0)
    with pytest.raises(RuntimeError, match="update_scores"):
        pruner.prune(0.5)
    with pytest.raises(ValueError, match="ratio"):
        pruner.prune(1.5)
    with pytest.raises(ValueError, match="layers"):
        LoraPruner(tiny_model(layers=4), LoraPruneConfig(layers=(7,)))
    with pytest.raises(TypeError, match="config"):
        LoraPruner(tiny_model(), {"ratio": 0.5})
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        LoraPruner(gpt2)
    with pytest.raises(FileNotFoundError, match="model_dir"):
        loraprune.load_model(tmp_path / "missing")
    gpt2.config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unsupported architecture"):
        loraprune.load_model(tmp_path)
