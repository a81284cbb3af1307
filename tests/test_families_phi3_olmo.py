"""Phi-3 / Phi-4 (fused qkv_proj and gate_up_proj, split while pruning) and OLMo 2 / OLMo 3 (q/k norms
over the whole projection width, rewritten at compaction) on tiny random configs: pruned, compacted,
saved, loaded where loraprune is not installed, pruned again, and their GGUF export or its refusal.

GQA and MHA, tied and untied embeddings, head_dim != hidden/heads and OLMo's attention biases are
spread over the configs (Phi-3 has no biases). The helpers are test_families' own.
"""

from __future__ import annotations

import copy
import json
import math

import gguf
import numpy as np
import pytest
import torch
from test_families import (
    assert_close,
    check_cli_prune,
    check_folders_load_without_loraprune,
    check_save_load_and_pruning_again,
    logits,
    masked_and_compacted,
    with_tokenizer,
)
from tiny_models import random_tokens, randomize_weights
from transformers import (
    Olmo2Config,
    Olmo2ForCausalLM,
    Olmo3Config,
    Olmo3ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
)

from loraprune import LoraPruneConfig, LoraPruner
from loraprune.cli import main
from loraprune.export import export_gguf
from loraprune.families import FAMILIES
from loraprune.fused import FusedRowsView, split_fused

# name -> (config class, model class, heads, KV heads, tied, biases)
CONFIGS = {
    "phi3-gqa-untied": (Phi3Config, Phi3ForCausalLM, 4, 2, False, False),
    "phi3-mha-tied": (Phi3Config, Phi3ForCausalLM, 4, 4, True, False),
    "olmo2-gqa-untied-bias": (Olmo2Config, Olmo2ForCausalLM, 4, 2, False, True),
    "olmo2-mha-tied": (Olmo2Config, Olmo2ForCausalLM, 4, 4, True, False),
    "olmo3-gqa-tied-window": (Olmo3Config, Olmo3ForCausalLM, 4, 2, True, True),
}
HIDDEN, HEAD_DIM = 48, 16  # 4 heads of 16 != 48 / 4


def family_model(name: str, layers: int = 4, seed: int = 0, vocab: int = 96, **overrides) -> torch.nn.Module:
    config_cls, model_cls, heads, kv_heads, tied, bias = CONFIGS[name]
    extra = {} if config_cls is Phi3Config else {"attention_bias": bias}
    if config_cls is Olmo3Config:  # a window shorter than the test sequences: layers 0-2 slide, 3 does not
        extra["sliding_window"] = 6
    config = config_cls(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        intermediate_size=40,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **extra,
        **{"head_dim": HEAD_DIM, **overrides},
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    randomize_weights(model)  # OLMo's q/k norm weights ~ N(1, 0.2) too
    return model


def pruned_layer_widths(model) -> list[int]:
    return [layer.mlp.down_proj.in_features for layer in model.model.layers]


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize(
    ("name", "gqa_unit"),
    [(name, "kv_group") for name in CONFIGS]
    + [(name, "q_head") for name, spec in CONFIGS.items() if spec[2] > spec[3]],
)
def test_compacted_logits_equal_masked_logits(name, gqa_unit, lora):
    """Without LoRA, the slicing, fusing and norm rewrite alone: within test_families' 1e-5 of the
    logit scale. With random LoRA factors merged, within test_pruning_core's 1e-4: on these random
    models the fp32 merge alone moves a plain LLaMA's logits by up to 5e-5 of their scale."""
    masked, model = masked_and_compacted(family_model(name), gqa_unit=gqa_unit, lora=lora)
    family = FAMILIES[CONFIGS[name][0].model_type]
    assert type(model) is family.pruned_classes[1] and model.config.model_type == family.pruned_model_type
    widths = pruned_layer_widths(model)
    assert widths[3] == 40 and min(widths[:3]) < 40
    got = logits(model, random_tokens(length=16))
    error, scale = float((got - masked).abs().max()), max(1.0, float(masked.abs().max()))
    print(f"{name} {gqa_unit} lora={lora}: compacted vs masked, max |logit difference| {error:.3g}")
    assert error <= (1e-4 if lora else 1e-5) * scale, (error, scale)


def test_phi3_is_split_while_pruning_and_fused_again_by_compaction():
    model = family_model("phi3-gqa-untied")
    tokens = random_tokens(length=16)
    fused = logits(model, tokens)
    split_fused(model)
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert isinstance(attention.qkv_proj, FusedRowsView) and isinstance(mlp.gate_up_proj, FusedRowsView)
    assert [attention.q_proj.out_features, attention.k_proj.out_features] == [4 * HEAD_DIM, 2 * HEAD_DIM]
    assert mlp.gate_proj.out_features == mlp.up_proj.out_features == 40
    names = set(model.state_dict())
    assert "model.layers.0.self_attn.q_proj.weight" in names and not any("qkv" in n for n in names)
    error = float((logits(model, tokens) - fused).abs().max())
    print(f"Phi-3 split vs fused: max |logit difference| {error:.3g}")
    assert error <= 1e-6 * float(fused.abs().max())
    compacted = LoraPruner(model, LoraPruneConfig(ratio=0.0)).compact().eval()
    layer = compacted.model.layers[0]
    assert type(layer.self_attn.qkv_proj) is torch.nn.Linear and not hasattr(layer.self_attn, "q_proj")
    assert type(layer.mlp.gate_up_proj) is torch.nn.Linear and not hasattr(layer.mlp, "gate_proj")
    assert_close(logits(compacted, tokens), fused)


def test_peft_adapter_on_fused_qkv_splits_into_member_adapters_exactly():
    from peft import LoraConfig, get_peft_model

    model = family_model("phi3-gqa-untied")
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "gate_up_proj"], lora_dropout=0.0)
    )
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # an adapter as if trained: B is not 0
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    tokens = random_tokens(length=16)
    reference = logits(peft_model, tokens)
    fused_b = peft_model.base_model.model.model.layers[1].self_attn.qkv_proj.lora_B["default"].weight.clone()
    pruner = LoraPruner(peft_model, LoraPruneConfig(ratio=0.0, lora_dropout=0.0))
    attention = pruner.model.model.layers[1].self_attn
    starts = {"q_proj": 0, "k_proj": 4 * HEAD_DIM, "v_proj": 6 * HEAD_DIM}
    for name, start in starts.items():
        member = getattr(attention, name)
        assert member.r == 4 and member.scaling == 2.0
        assert torch.equal(member.lora_B, fused_b[start : start + member.out_features])
    assert torch.equal(attention.q_proj.lora_A, attention.v_proj.lora_A)
    error = assert_close(logits(pruner.model.eval(), tokens), reference)
    print(f"PEFT adapter on qkv_proj/gate_up_proj, split: max |logit difference| {error:.3g}")
    merged = pruner.compact().eval()
    assert_close(logits(merged, tokens), reference)


@pytest.mark.parametrize("name", ["olmo2-gqa-untied-bias", "olmo2-mha-tied"])
def test_olmo2_norm_rewrite_is_exact_where_naive_slicing_is_not(name):
    masked, model = masked_and_compacted(family_model(name), lora=False)  # the slicing alone
    tokens = random_tokens(length=16)
    error = assert_close(logits(model, tokens), masked)
    naive = copy.deepcopy(model)
    full = {"q_norm": 4 * HEAD_DIM, "k_norm": CONFIGS[name][3] * HEAD_DIM}
    eps = model.config.rms_norm_eps
    for index, entry in enumerate(model.config.pruned_layers):
        attention = naive.model.layers[index].self_attn
        for norm_name, width in full.items():
            norm = getattr(attention, norm_name)
            kept = norm.weight.shape[0]
            assert entry["norm_eps"][f"self_attn.{norm_name}"] == pytest.approx(eps * width / kept, rel=1e-12)
            with torch.no_grad():  # undo the rewrite: the kept entries of the original weight, eps as it was
                norm.weight.div_(math.sqrt(width / kept))
            norm.variance_epsilon = eps
    naive_error = float((logits(naive, tokens) - masked).abs().max())
    print(f"{name}: norm rewrite max |logit difference| {error:.3g}, naive slicing {naive_error:.3g}")
    assert naive_error > 1e-2


# (every config's folder is also loaded, bit-exact, in test_folders_load_without_loraprune_with_equal_outputs)
@pytest.mark.parametrize("name", ["phi3-gqa-untied", "olmo2-gqa-untied-bias", "olmo3-gqa-tied-window"])
def test_save_load_bit_exact_and_pruning_again_composes(name, tmp_path):
    _, model = masked_and_compacted(family_model(name))
    check_save_load_and_pruning_again(model, tmp_path)


def test_folders_load_without_loraprune_with_equal_outputs(tmp_path):
    check_folders_load_without_loraprune({name: family_model(name) for name in CONFIGS}, tmp_path)


@pytest.mark.parametrize("name", ["phi3-mha-tied", "olmo2-gqa-untied-bias"])
def test_cli_prune_writes_the_family_pruned_checkpoint(name, tiny_llama_dir, calib_text, tmp_path, capsys):
    model = check_cli_prune(family_model(name, vocab=8192), tiny_llama_dir, calib_text, tmp_path)
    assert min(pruned_layer_widths(model)) < 40
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["info", str(out), "--json"]) == 0  # per-layer counts, read from the (fused) modules
    info = json.loads(capsys.readouterr().out)
    plan = json.loads((out / "config.json").read_text())["pruned_layers"]
    assert [layer["heads"] for layer in info["layers"]] == [e["num_attention_heads"] for e in plan]
    assert [layer["channels"] for layer in info["layers"]] == [e["intermediate_size"] for e in plan]


def test_phi3_exports_as_deci_with_split_tensors_and_per_layer_counts(tiny_llama_dir, tmp_path):
    _, model = masked_and_compacted(family_model("phi3-gqa-untied", vocab=8192))
    folder = with_tokenizer(model, tmp_path / "model", tiny_llama_dir)
    reader = gguf.GGUFReader(export_gguf(folder, tmp_path / "m.gguf", outtype="f32").path)

    def field(key: str):
        return reader.fields[key].contents()

    plan = model.config.pruned_layers
    assert field("general.architecture") == "deci"
    assert field("deci.attention.head_count") == [e["num_attention_heads"] for e in plan]
    assert field("deci.attention.head_count_kv") == [e["num_key_value_heads"] for e in plan]
    assert field("deci.feed_forward_length") == [e["intermediate_size"] for e in plan]
    tensors = {t.name: np.array(t.data).reshape([int(d) for d in reversed(t.shape)]) for t in reader.tensors}
    for index, layer in enumerate(model.model.layers):
        entry, qkv = plan[index], layer.self_attn.qkv_proj.weight
        kv_rows = entry["num_key_value_heads"] * HEAD_DIM
        v = qkv[qkv.shape[0] - kv_rows :]
        assert torch.equal(torch.from_numpy(tensors[f"blk.{index}.attn_v.weight"]), v)
        gate = layer.mlp.gate_up_proj.weight[: entry["intermediate_size"]]
        assert torch.equal(torch.from_numpy(tensors[f"blk.{index}.ffn_gate.weight"]), gate)
        assert tensors[f"blk.{index}.attn_q.weight"].shape[0] == entry["num_attention_heads"] * HEAD_DIM


@pytest.mark.parametrize(
    ("name", "overrides", "reason"),
    [
        ("olmo2-mha-tied", {}, "OLMo 2 has no GGUF export.*one global head count.*hidden/heads"),
        ("olmo3-gqa-tied-window", {}, "OLMo 3 has no GGUF export.*one global head count"),
        (
            "phi3-gqa-untied",
            {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
            "partial_rotary_factor 0.5 has no GGUF export.*rotates whole heads",
        ),
        (
            "phi3-mha-tied",
            {
                "rope_parameters": {
                    "rope_type": "longrope",
                    "rope_theta": 1e4,
                    "short_factor": [1.0] * 6,
                    "long_factor": [2.0] * 6,
                },
                "original_max_position_embeddings": 32,
                "head_dim": HIDDEN // 4,  # transformers' longrope checks its factors against hidden/heads
            },
            "rope_type 'longrope' has no GGUF export.*short and long factors",
        ),
    ],
)
def test_gguf_refusals_name_the_reason_and_write_nothing(name, overrides, reason, tiny_llama_dir, tmp_path):
    dense = with_tokenizer(family_model(name, vocab=8192, **overrides), tmp_path / "dense", tiny_llama_dir)
    with pytest.raises(ValueError, match=reason):
        export_gguf(dense, tmp_path / "m.gguf", outtype="f32")
    assert list(tmp_path.iterdir()) == [dense]
