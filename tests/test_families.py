"""Families beyond LLaMA's own checkpoints (Granite, Qwen3, Gemma 2, Gemma 3, SmolLM3) on tiny random
configs: pruned, compacted, saved, loaded where loraprune is not installed, and pruned again.

Each config has head_dim != hidden/heads; GQA and MHA, tied and untied embeddings and the biases
the family has are spread over the configs. The Gemma configs scale scores by a
query_pre_attn_scalar other than head_dim and have a sliding window (8) shorter than the prompts
(16 tokens); one Gemma 2 soft-caps scores and logits; SmolLM3 skips RoPE in every second layer.
"""

from __future__ import annotations

import json
import re
import shutil

import gguf
import numpy as np
import pytest
import torch
from remote_code import NEW_TOKENS, PROMPT_LENGTH, load_without_loraprune
from tiny_models import random_tokens, randomize_lora, randomize_weights
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GraniteConfig,
    GraniteForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)

from loraprune import LoraPruneConfig, LoraPruner
from loraprune.cli import main
from loraprune.export import export_gguf
from loraprune.families import FAMILIES
from loraprune.families.granite.fold import MULTIPLIERS

# multipliers of the size Granite 3.x checkpoints use, none of them 1
GRANITE_MULTIPLIERS = {
    "embedding_multiplier": 12.0,
    "attention_multiplier": 0.015625,
    "residual_multiplier": 0.22,
    "logits_scaling": 8.0,
}
# Gemma: scores scaled by 24 ** -0.5 (not head_dim's 16 ** -0.5); a window shorter than the prompts;
# Gemma 3's sliding and global layers alternate (its default pattern, 5 sliding to 1 global, would make
# all 4 layers sliding)
GEMMA = {"query_pre_attn_scalar": 24, "sliding_window": 8}
# soft-caps small enough to bend scores and logits of this size (Gemma 2's own: 50 and 30)
GEMMA2_SOFTCAPS = {"attn_logit_softcapping": 10.0, "final_logit_softcapping": 5.0}
GEMMA2_NO_SOFTCAPS = {"attn_logit_softcapping": None, "final_logit_softcapping": None}
# SmolLM3: NoPE in every second layer; its default special-token ids lie outside a tiny vocabulary
SMOLLM3 = {"no_rope_layer_interval": 2, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
# name -> (config class, model class, heads, KV heads, tied, biases)
CONFIGS = {
    "granite-gqa-tied-bias": (GraniteConfig, GraniteForCausalLM, 4, 2, True, True),
    "granite-mha-untied": (GraniteConfig, GraniteForCausalLM, 4, 4, False, False),
    "qwen3-gqa-tied": (Qwen3Config, Qwen3ForCausalLM, 4, 2, True, False),
    "qwen3-mha-untied-bias": (Qwen3Config, Qwen3ForCausalLM, 4, 4, False, True),
    "gemma2-gqa-tied-softcap": (Gemma2Config, Gemma2ForCausalLM, 4, 2, True, False),
    "gemma2-mha-untied-bias": (Gemma2Config, Gemma2ForCausalLM, 4, 4, False, True),
    "gemma3-gqa-tied": (Gemma3TextConfig, Gemma3ForCausalLM, 4, 2, True, False),
    "gemma3-mha-untied-bias": (Gemma3TextConfig, Gemma3ForCausalLM, 4, 4, False, True),
    "smollm3-gqa-tied-bias": (SmolLM3Config, SmolLM3ForCausalLM, 4, 2, True, True),
    "smollm3-mha-untied": (SmolLM3Config, SmolLM3ForCausalLM, 4, 4, False, False),
}
HIDDEN, HEAD_DIM = 48, 16  # 4 heads of 16 != 48 / 4


def family_options(name: str, layers: int = 4) -> dict:
    """The config options of ``name`` (of ``layers`` decoder layers) beyond the shared sizes: its family's own."""
    config_cls, bias = CONFIGS[name][0], CONFIGS[name][5]
    if config_cls is GraniteConfig:
        return GRANITE_MULTIPLIERS | {"mlp_bias": bias}
    if config_cls is Gemma2Config:
        return GEMMA | (GEMMA2_SOFTCAPS if "softcap" in name else GEMMA2_NO_SOFTCAPS)
    if config_cls is Gemma3TextConfig:
        return GEMMA | {
            "layer_types": [("sliding_attention", "full_attention")[i % 2] for i in range(layers)]
        }
    if config_cls is SmolLM3Config:
        return SMOLLM3 | {"mlp_bias": bias}
    return {}


TOLERANCE = 1e-5  # fp32: relative to the logits' scale (at least 1)
# With random LoRA factors, the masked model adds the LoRA product apart and the compacted one merged: the
# two round differently in fp32. SmolLM3 computes as LLaMA (no q/k norms, no post-norms), which amplifies
# that rounding more: 1e-5 to 9e-5 of the logit scale on these configs over seeds, as for LLaMA itself
# (test_pruning_core bounds LLaMA by 1e-4); without LoRA its compacted logits are the masked ones exactly
# (test_compacted_logits_equal_masked_logits_without_lora).
LORA_TOLERANCE = {"smollm3": 1e-4}


def family_model(name: str, layers: int = 4, seed: int = 0, vocab: int = 96, **options) -> torch.nn.Module:
    """The tiny random model ``name`` (``options``: config options replacing its family's)."""
    config_cls, model_cls, heads, kv_heads, tied, bias = CONFIGS[name]
    config = config_cls(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        intermediate_size=40,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=HEAD_DIM,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        attention_bias=bias,
        **(family_options(name, layers) | options),
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    randomize_weights(model)
    assert model.model.layers[0].self_attn.q_proj.out_features == heads * HEAD_DIM != HIDDEN
    return model


def logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits


def assert_close(got: torch.Tensor, expected: torch.Tensor, tolerance: float = TOLERANCE) -> float:
    """Max |difference|, asserted within ``tolerance`` of the logits' scale; returned for reports."""
    error, scale = float((got - expected).abs().max()), max(1.0, float(expected.abs().max()))
    assert error <= tolerance * scale, f"max |difference| {error:.3g} at logit scale {scale:.3g}"
    return error


def masked_and_compacted(
    model: torch.nn.Module, ratio: float = 0.5, lora: bool = True, **options
) -> tuple[torch.Tensor, torch.nn.Module]:
    """Logits of ``model`` with masks (and random LoRA factors, unless ``lora`` is False) after a
    gradient-scored prune, and the compacted model."""
    options.setdefault("layers", (0, 1, 2))
    # the LoRA tolerances above were measured on the units taylor chooses: other masks round otherwise
    options.setdefault("criterion", "taylor")
    pruner = LoraPruner(model, LoraPruneConfig(ratio=ratio, lora_dropout=0.0, ranking="global", **options))
    if lora:
        randomize_lora(pruner.model)
    tokens = random_tokens()
    pruner.model(input_ids=tokens, labels=tokens).loss.backward()
    pruner.update_scores()
    pruner.prune()
    pruner.model.eval()
    masked = logits(pruner.model, random_tokens(length=16))
    return masked, pruner.compact().eval()


@pytest.mark.parametrize(
    ("name", "gqa_unit"),
    [(name, "kv_group") for name in CONFIGS]
    + [
        (name, "q_head") for name, spec in CONFIGS.items() if spec[2] > spec[3]
    ],  # q_head differs with GQA only
)
def test_compacted_logits_equal_masked_logits(name, gqa_unit):
    masked, model = masked_and_compacted(family_model(name), gqa_unit=gqa_unit)
    family = FAMILIES[CONFIGS[name][0].model_type]
    assert type(model) is family.pruned_classes[1] and model.config.model_type == family.pruned_model_type
    widths = [layer.mlp.gate_proj.out_features for layer in model.model.layers]
    assert widths[3] == 40 and min(widths[:3]) < 40
    assert_close(
        logits(model, random_tokens(length=16)), masked, LORA_TOLERANCE.get(family.model_type, TOLERANCE)
    )


NEW_FAMILY_CONFIGS = [name for name in CONFIGS if name.startswith(("gemma", "smollm3"))]


@pytest.mark.parametrize("name", NEW_FAMILY_CONFIGS)
def test_compacted_logits_equal_masked_logits_without_lora(name):
    """Slicing alone (LoRA left at B = 0): nothing of Gemma's norms, scales, soft-caps and windows or of
    SmolLM3's NoPE layers depends on the removed heads and channels."""
    masked, model = masked_and_compacted(family_model(name), lora=False)
    assert_close(logits(model, random_tokens(length=16)), masked, 1e-6)


def test_the_configs_exercise_windows_softcaps_and_nope():
    """Each family feature the configs set changes the logits of their 16-token prompts, so the checks
    here cover it: Gemma's window of 8 and query_pre_attn_scalar, Gemma 2's soft-caps, SmolLM3's NoPE."""
    tokens = random_tokens(length=16)
    changes = {
        "gemma2-gqa-tied-softcap": [
            {"sliding_window": 64},
            {"query_pre_attn_scalar": HEAD_DIM},
            {"attn_logit_softcapping": None},
            {"final_logit_softcapping": None},
        ],
        "gemma3-gqa-tied": [{"sliding_window": 64}, {"query_pre_attn_scalar": HEAD_DIM}],
        "smollm3-gqa-tied-bias": [{"no_rope_layers": [1] * 4}],
    }
    assert family_model("smollm3-gqa-tied-bias").config.no_rope_layers == [1, 0, 1, 0]
    for name, variants in changes.items():
        reference = logits(family_model(name), tokens)
        for change in variants:  # the same weights (same seed and shapes) under the changed config
            assert (logits(family_model(name, **change), tokens) - reference).abs().max() > 1e-3, (
                name,
                change,
            )


@pytest.mark.parametrize("name", ["granite-gqa-tied-bias", "granite-mha-untied"])
def test_granite_folds_into_llama_with_granite_logits(name):
    granite = family_model(name)
    tokens = random_tokens(length=16)
    reference = logits(granite, tokens)
    model = LoraPruner(granite, LoraPruneConfig(ratio=0.0)).compact().eval()  # nothing pruned: the fold alone
    assert type(model).__name__ == "PrunedLlamaForCausalLM"
    assert not any(hasattr(model.config, name) for name in MULTIPLIERS)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == CONFIGS[name][4]
    error = assert_close(logits(model, tokens), reference)
    print(
        f"{name}: Granite fold, max |logit difference| {error:.3g} (logits up to {reference.abs().max():.3g})"
    )


# (every config's folder is also loaded, bit-exact, in test_folders_load_without_loraprune_with_equal_outputs)
@pytest.mark.parametrize(
    "name",
    [
        "granite-gqa-tied-bias",
        "qwen3-mha-untied-bias",
        "gemma2-gqa-tied-softcap",
        "gemma3-mha-untied-bias",
        "smollm3-gqa-tied-bias",
    ],
)
def test_save_load_bit_exact_and_pruning_again_composes(name, tmp_path):
    _, model = masked_and_compacted(family_model(name))
    loaded = check_save_load_and_pruning_again(model, tmp_path)
    if FAMILIES[CONFIGS[name][0].model_type].fold is None:  # the family's own settings, as they were
        for key, value in family_options(name).items():
            assert getattr(loaded.config, key) == value, key


def check_save_load_and_pruning_again(model: torch.nn.Module, tmp_path) -> torch.nn.Module:
    """A compacted ``model`` saves and loads bit-exact (returned: the loaded one), and pruning the loaded
    model again composes the plans (kept indices of the original model)."""
    model.save_pretrained(tmp_path / "first")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "first", dtype=torch.float32).eval()
    assert type(loaded) is type(model)
    tokens = random_tokens(length=16)
    assert torch.equal(logits(loaded, tokens), logits(model, tokens))
    first_plan = loaded.config.pruned_layers
    # LoRA left at B = 0: the merge is tested above; here, the slicing of already sliced layers
    masked, again = masked_and_compacted(loaded, lora=False, layers=(1, 2, 3))
    assert_close(logits(again, random_tokens(length=16)), masked)
    for before, after in zip(first_plan, again.config.pruned_layers, strict=True):
        for key in ("kept_heads", "kept_kv_heads", "kept_channels"):
            assert set(after[key]) <= set(before[key]), key  # indices of the original model
    assert again.config.pruned_layers[3]["intermediate_size"] < first_plan[3]["intermediate_size"] == 40
    return loaded


def test_folders_load_without_loraprune_with_equal_outputs(tmp_path):
    check_folders_load_without_loraprune({name: family_model(name) for name in CONFIGS}, tmp_path)


def check_folders_load_without_loraprune(dense: dict[str, torch.nn.Module], tmp_path) -> None:
    """Each model, masked and compacted, saved and loaded where loraprune is not installed, gives the same
    logits and greedy tokens."""
    folders, models = {}, {}
    for name, model in dense.items():
        _, models[name] = masked_and_compacted(model)
        folders[name] = tmp_path / name
        models[name].save_pretrained(folders[name])
    tokens = random_tokens(length=16)
    results = load_without_loraprune(folders, tokens, tmp_path)
    for name, folder in folders.items():
        config = json.loads((folder / "config.json").read_text())
        class_name, remote_logits, remote_greedy = results[name]
        assert class_name == config["architectures"][0] == type(models[name]).__name__
        assert torch.equal(remote_logits, logits(models[name], tokens)), name
        greedy = models[name].generate(
            tokens[:1, :PROMPT_LENGTH], max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
        )
        assert torch.equal(remote_greedy, greedy), name


def with_tokenizer(model: torch.nn.Module, folder, tiny_llama_dir):
    """``model`` saved with the tiny-llama fixture's tokenizer (its vocabulary: 8192)."""
    model.save_pretrained(folder)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama_dir / file, folder / file)
    return folder


@pytest.mark.parametrize(
    "name",
    [
        "granite-mha-untied",
        "qwen3-gqa-tied",
        "gemma2-gqa-tied-softcap",
        "gemma3-gqa-tied",
        "smollm3-mha-untied",
    ],
)
def test_cli_prune_writes_the_family_pruned_checkpoint(name, tiny_llama_dir, calib_text, tmp_path):
    model = check_cli_prune(family_model(name, vocab=8192), tiny_llama_dir, calib_text, tmp_path)
    widths = [layer.mlp.gate_proj.out_features for layer in model.model.layers]
    assert min(widths) < 40


def check_cli_prune(dense: torch.nn.Module, tiny_llama_dir, calib_text, tmp_path) -> torch.nn.Module:
    """``loraprune prune`` on ``dense`` (saved with the fixture's tokenizer) writes the family's pruned
    checkpoint with the tokenizer; returns it loaded through the Auto classes (``tmp_path / "out"``)."""
    folder = with_tokenizer(dense, tmp_path / "dense", tiny_llama_dir)
    out = tmp_path / "out"
    run = ["--ratio", "0.5", "--steps", "2", "--prune-every", "1", "--seq-len", "32", "--batch-size", "2"]
    assert main(["prune", str(folder), "--data", str(calib_text), "--out", str(out), *run, "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == FAMILIES[dense.config.model_type].pruned_model_type
    assert (out / "tokenizer.json").is_file()
    return AutoModelForCausalLM.from_pretrained(out)


def test_tied_qwen3_exports_as_openelm_with_per_layer_counts_and_fused_qkv(tiny_llama_dir, tmp_path):
    _, model = masked_and_compacted(family_model("qwen3-gqa-tied", vocab=8192))
    folder = with_tokenizer(model, tmp_path / "model", tiny_llama_dir)
    reader = gguf.GGUFReader(export_gguf(folder, tmp_path / "m.gguf", outtype="f32").path)

    def field(key: str):
        return reader.fields[key].contents()

    plan = model.config.pruned_layers
    assert field("general.architecture") == "openelm"
    assert field("openelm.attention.head_count") == [e["num_attention_heads"] for e in plan]
    assert field("openelm.attention.head_count_kv") == [e["num_key_value_heads"] for e in plan]
    assert field("openelm.feed_forward_length") == [e["intermediate_size"] for e in plan]
    for key in ("attention.key_length", "attention.value_length", "rope.dimension_count"):
        assert field(f"openelm.{key}") == HEAD_DIM
    tensors = {t.name: np.array(t.data).reshape([int(d) for d in reversed(t.shape)]) for t in reader.tensors}
    assert "output.weight" not in tensors  # openelm's output is token_embd
    for index, layer in enumerate(model.model.layers):
        attention = layer.self_attn
        qkv = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
        assert torch.equal(
            torch.from_numpy(tensors[f"blk.{index}.attn_qkv.weight"]), qkv
        )  # rotate-half: unpermuted
        assert torch.equal(
            torch.from_numpy(tensors[f"blk.{index}.attn_q_norm.weight"]), attention.q_norm.weight
        )
    state = model.state_dict()
    assert len(tensors) == len(state) - 1 - 2 * len(plan)  # lm_head, and q/k/v fused into one


GEMMA_GGUF = "one head count and MLP width.*deci, openelm.*post-attention and post-MLP norms"


@pytest.mark.parametrize(
    ("name", "reason", "pruned"),
    [
        (
            "qwen3-mha-untied-bias",
            "untied embeddings.*one global head count.*openelm.*ties the output",
            False,
        ),
        ("granite-mha-untied", "dense Granite.*multipliers.*prune it", False),
    ]
    + [
        (name, reason, pruned)
        for name, reason in [
            ("gemma2-gqa-tied-softcap", f"Gemma 2 .*{GEMMA_GGUF}, GeGLU MLP and logit soft-capping"),
            ("gemma3-gqa-tied", f"Gemma 3 .*{GEMMA_GGUF} and GeGLU MLP"),
            ("smollm3-mha-untied", "SmolLM3 .*deci.*RoPE in every layer.*no_rope_layer_interval"),
        ]
        for pruned in (False, True)
    ],
)
def test_gguf_refusals_name_the_reason_and_write_nothing(name, reason, pruned, tiny_llama_dir, tmp_path):
    model = family_model(name, vocab=8192)
    if pruned:
        model = masked_and_compacted(model)[1]
    folder = with_tokenizer(model, tmp_path / "model", tiny_llama_dir)
    with pytest.raises(ValueError, match=reason):
        export_gguf(folder, tmp_path / "m.gguf", outtype="f32")
    assert list(tmp_path.iterdir()) == [folder]


def multimodal_gemma3(tied: bool) -> torch.nn.Module:
    """A tiny random Gemma 3 with a vision tower (model_type gemma3), its language model as gemma3-gqa-tied."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    text = family_model("gemma3-gqa-tied").config.to_dict() | {"tie_word_embeddings": tied}
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        boi_token_index=93,
        eoi_token_index=94,
        image_token_index=95,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config).eval()
    randomize_weights(model)
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_multimodal_gemma3_is_refused_with_the_way_out_which_works(tied, tmp_path, capsys):
    """A Gemma 3 with a vision tower is refused, naming why and the command that saves its language model
    alone; that command writes a gemma3_text checkpoint computing the same text logits, which prunes."""
    from loraprune.families.gemma3.__main__ import main as save_text_main

    multimodal = multimodal_gemma3(tied)
    way_out = "multimodal Gemma 3.*vision tower.*python -m loraprune.families.gemma3 MODEL_DIR OUT_DIR"
    with pytest.raises(ValueError, match=way_out):
        LoraPruner(multimodal, LoraPruneConfig(ratio=0.5))
    multimodal.save_pretrained(tmp_path / "multimodal")
    data = tmp_path / "data.txt"
    data.write_text("text " * 200)
    args = ["prune", str(tmp_path / "multimodal"), "--data", str(data), "--out", str(tmp_path / "out")]
    capsys.readouterr()
    assert main([*args, "--ratio", "0.5", "--steps", "2"]) == 2 and not (tmp_path / "out").exists()
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("loraprune prune: error: MODEL: 'gemma3'") and re.search(way_out, line), line

    assert save_text_main([str(tmp_path / "multimodal"), str(tmp_path / "text")]) == 0
    assert json.loads((tmp_path / "text" / "config.json").read_text())["model_type"] == "gemma3_text"
    text = AutoModelForCausalLM.from_pretrained(tmp_path / "text", dtype=torch.float32).eval()
    assert type(text) is Gemma3ForCausalLM
    assert (text.lm_head.weight is text.model.embed_tokens.weight) == tied
    tokens = random_tokens(length=16, vocab=93)  # text tokens (93-95 are the image markers)
    assert torch.equal(logits(text, tokens), logits(multimodal, tokens))
    masked, pruned = masked_and_compacted(text)
    assert type(pruned).__name__ == "PrunedGemma3ForCausalLM"
    assert_close(logits(pruned, random_tokens(length=16)), masked)
