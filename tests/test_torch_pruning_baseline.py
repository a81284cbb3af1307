"""The Torch-Pruning baseline of the quality study (benchmarks/torch_pruning_baseline.py) on tiny
random LLaMAs with SmolLM2's 9 query / 3 KV heads and tiny-llama-gqa's 6 / 3 (where Torch-Pruning's
trace of the rotary embedding loops unless worked around): it prunes the requested layers to
loraprune's parameter count, removes what Torch-Pruning itself removes, and its folder loads through
the Auto classes and fine-tunes through ``loraprune prune --ratio 0``."""

from __future__ import annotations

import copy
import json
import shutil
import sys

import pytest
import torch
from conftest import REPO_ROOT
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import loraprune  # noqa: F401  (registers the pruned classes)
from loraprune import LoraPruneConfig, LoraPruner
from loraprune.cli import main as loraprune_main
from loraprune.models import set_attention_heads
from loraprune.structures import default_layers

pytest.importorskip(
    "torch_pruning", reason="the Torch-Pruning baseline needs pip install torch-pruning==1.6.1"
)
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # benchmarks/ is not installed: import it from the checkout
from benchmarks import torch_pruning_baseline as baseline

LAYERS, KV_HEADS, HEAD_DIM, CHANNELS = 4, 3, 8, 96
VOCAB = 8192  # the shared tiny-llama tokenizer's


def tiny_gqa_llama(heads: int = 9) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=72,
        intermediate_size=CHANNELS,
        num_hidden_layers=LAYERS,
        num_attention_heads=heads,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # HF's 0.02 init gives near-equal scores: ties would decide
        for param in model.parameters():
            if param.ndim == 2:
                param.normal_(0, 0.2)
    return model


def loraprune_count(model: torch.nn.Module, ratio: float) -> int:
    """What ``loraprune prune --ratio RATIO`` really leaves (default units and layers)."""
    pruner = LoraPruner(copy.deepcopy(model), LoraPruneConfig(ratio=ratio, criterion="magnitude", lora_r=1))
    pruner.update_scores()
    pruner.prune()
    return sum(p.numel() for p in pruner.compact().parameters())


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_gqa_llama()


@pytest.mark.parametrize(
    ("heads", "ratio", "importance"), [(9, 0.5, "magnitude"), (9, 0.2, "taylor"), (6, 0.5, "taylor")]
)
def test_prunes_the_requested_layers_to_loraprunes_parameter_count(heads, ratio, importance):
    model = tiny_gqa_llama(heads)
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    target = loraprune_count(model, ratio)

    pruned, report = baseline.prune_with_torch_pruning(copy.deepcopy(model), ratio, importance, tokens)

    after = sum(p.numel() for p in pruned.parameters())
    assert report["parameters"]["target"] == target  # the plan's count is loraprune's real one
    assert report["parameters"]["after"] == after
    # within one MLP channel per pruned layer of it (the MLP width is the free variable)
    assert abs(after - target) <= len(default_layers(LAYERS)) * 3 * 72
    per_kv_group = heads // KV_HEADS
    for index, entry in enumerate(pruned.config.pruned_layers):
        assert entry["num_key_value_heads"] == KV_HEADS  # Torch-Pruning never prunes k/v with GQA
        if index in default_layers(LAYERS):
            removed = report["plan"]["heads_removed_per_kv_group"]
            assert entry["num_attention_heads"] == KV_HEADS * (per_kv_group - removed)
            assert entry["intermediate_size"] == CHANNELS - report["plan"]["channels_removed"]
        else:
            assert (entry["num_attention_heads"], entry["intermediate_size"]) == (heads, CHANNELS)
    assert torch.isfinite(pruned(tokens).logits).all()


def test_removes_what_torch_pruning_itself_removes(model):
    """At 20% (2 query heads per KV group stay, where Torch-Pruning's own removal works) its pruned
    model and the baseline's compacted one compute the same logits."""
    ratio, tokens = 0.2, torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    ours, _ = baseline.prune_with_torch_pruning(copy.deepcopy(model), ratio, "magnitude")
    theirs = copy.deepcopy(model)
    with baseline.torch_pruner(theirs, baseline.plan_for(theirs, ratio), "magnitude") as pruner:
        for group in pruner.step(interactive=True):
            group.prune()
    for layer in theirs.model.layers:
        attention = layer.self_attn
        heads, kv_heads = (attention.q_proj.out_features, attention.k_proj.out_features)
        set_attention_heads(attention, heads // attention.head_dim, kv_heads // attention.head_dim)

    with torch.no_grad():
        torch.testing.assert_close(ours(tokens).logits, theirs(tokens).logits, rtol=0, atol=0)


def test_the_command_writes_a_folder_that_loads_and_recovers_through_loraprune(
    model, tiny_llama_dir, calib_text, tmp_path
):
    source = tmp_path / "dense"
    model.save_pretrained(source)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama_dir / name, source / name)
    pruned_dir, recovered_dir, data = tmp_path / "tp", tmp_path / "recovered", tmp_path / "calib.txt"
    data.write_text(calib_text.read_text()[:20_000])  # tokenizing all of it takes longer than the rest
    common = ["--data", str(data), "--device", "cpu", "--dtype", "float32", "--quiet"]

    assert (
        baseline.main(
            [
                str(source),
                "--out",
                str(pruned_dir),
                "--ratio",
                "0.5",
                "--importance",
                "taylor",
                "--calib-samples",
                "2",
                "--calib-seq-len",
                "16",
                *common,
            ]
        )
        == 0
    )
    report = json.loads((pruned_dir / baseline.REPORT_NAME).read_text())
    assert report["calibration"] == {"data": str(data), "samples": 2, "seq_len": 16, "seed": 0}
    loaded = AutoModelForCausalLM.from_pretrained(pruned_dir)
    assert sum(p.numel() for p in loaded.parameters()) == report["parameters"]["after"]
    assert (
        loraprune_main(
            [
                "prune",
                str(pruned_dir),
                "--out",
                str(recovered_dir),
                "--ratio",
                "0",
                "--steps",
                "2",
                "--prune-every",
                "2",
                "--batch-size",
                "2",
                "--seq-len",
                "16",
                *common,
            ]
        )
        == 0
    )

    recovered = json.loads((recovered_dir / "prune_report.json").read_text())
    assert (
        recovered["parameters"]["before"] == recovered["parameters"]["after"] == report["parameters"]["after"]
    )
    final = AutoModelForCausalLM.from_pretrained(recovered_dir)
    assert [e["kept_heads"] for e in final.config.pruned_layers] == [
        e["kept_heads"] for e in loaded.config.pruned_layers
    ]  # the original numbering, composed through the second prune
    tokens = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(2))
    assert torch.isfinite(final(tokens).logits).all()
