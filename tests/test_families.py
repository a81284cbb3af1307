"""Families beyond LLaMA's own checkpoints (Granite, Qwen3) on tiny random configs: pruned, compacted,
saved, loaded where loraprune is not installed, and pruned again.

Each config has head_dim != hidden/heads; GQA and MHA, tied and untied embeddings and the biases
the family has are spread over the configs.
"""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from remote_code import NEW_TOKENS, PROMPT_LENGTH, load_without_loraprune
from tiny_models import random_tokens, randomize_lora, randomize_weights
from transformers import (
    AutoModelForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
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
# name -> (config class, model class, heads, KV heads, tied, biases)
CONFIGS = {
    "granite-gqa-tied-bias": (GraniteConfig, GraniteForCausalLM, 4, 2, True, True),
    "granite-mha-untied": (GraniteConfig, GraniteForCausalLM, 4, 4, False, False),
    "qwen3-gqa-tied": (Qwen3Config, Qwen3ForCausalLM, 4, 2, True, False),
    "qwen3-mha-untied-bias": (Qwen3Config, Qwen3ForCausalLM, 4, 4, False, True),
}
HIDDEN, HEAD_DIM = 48, 16  # 4 heads of 16 != 48 / 4
TOLERANCE = 1e-5  # fp32: relative to the logits' scale (at least 1)


def family_model(name: str, layers: int = 4, seed: int = 0, vocab: int = 96) -> torch.nn.Module:
    config_cls, model_cls, heads, kv_heads, tied, bias = CONFIGS[name]
    extra = GRANITE_MULTIPLIERS | {"mlp_bias": bias} if config_cls is GraniteConfig else {}
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
        **extra,
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    randomize_weights(model)
    assert model.model.layers[0].self_attn.q_proj.out_features == heads * HEAD_DIM != HIDDEN
    return model


def logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits


def assert_close(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Max |difference|, asserted within :data:`TOLERANCE` of the logits' scale; returned for reports."""
    error, scale = float((got - expected).abs().max()), max(1.0, float(expected.abs().max()))
    assert error <= TOLERANCE * scale, f"max |difference| {error:.3g} at logit scale {scale:.3g}"
    return error


def masked_and_compacted(
    model: torch.nn.Module, ratio: float = 0.5, lora: bool = True, **options
) -> tuple[torch.Tensor, torch.nn.Module]:
    """Logits of ``model`` with masks (and random LoRA factors, unless ``lora`` is False) after a
    gradient-scored prune, and the compacted model."""
    options.setdefault("layers", (0, 1, 2))
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
    assert_close(logits(model, random_tokens(length=16)), masked)


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
@pytest.mark.parametrize("name", ["granite-gqa-tied-bias", "qwen3-mha-untied-bias"])
def test_save_load_bit_exact_and_pruning_again_composes(name, tmp_path):
    _, model = masked_and_compacted(family_model(name))
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


def test_folders_load_without_loraprune_with_equal_outputs(tmp_path):
    folders, models = {}, {}
    for name in CONFIGS:
        _, models[name] = masked_and_compacted(family_model(name))
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


@pytest.mark.parametrize("name", ["granite-mha-untied", "qwen3-gqa-tied"])
def test_cli_prune_writes_the_family_pruned_checkpoint(name, tiny_llama_dir, calib_text, tmp_path):
    dense = with_tokenizer(family_model(name, vocab=8192), tmp_path / "dense", tiny_llama_dir)
    out = tmp_path / "out"
    run = ["--ratio", "0.5", "--steps", "2", "--prune-every", "1", "--seq-len", "32", "--batch-size", "2"]
    assert main(["prune", str(dense), "--data", str(calib_text), "--out", str(out), *run, "--quiet"]) == 0
    family = FAMILIES[CONFIGS[name][0].model_type]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family.pruned_model_type
    model = AutoModelForCausalLM.from_pretrained(out)
    widths = [layer.mlp.gate_proj.out_features for layer in model.model.layers]
    assert min(widths) < 40 and (out / "tokenizer.json").is_file()


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


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("qwen3-mha-untied-bias", "untied embeddings.*one global head count.*openelm.*ties the output"),
        ("granite-mha-untied", "dense Granite.*multipliers.*prune it"),
    ],
)
def test_gguf_refusals_name_the_reason_and_write_nothing(name, reason, tiny_llama_dir, tmp_path):
    dense = with_tokenizer(family_model(name, vocab=8192), tmp_path / "dense", tiny_llama_dir)
    with pytest.raises(ValueError, match=reason):
        export_gguf(dense, tmp_path / "m.gguf", outtype="f32")
    assert list(tmp_path.iterdir()) == [dense]
