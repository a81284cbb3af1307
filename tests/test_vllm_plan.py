"""The vLLM plugin's tensor-parallel check (a pure function: runs without vLLM)."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from loraprune.integrations.vllm import (
    ARCHITECTURES,
    check_tensor_parallel,
    layer_config,
    layer_shapes,
    register,
)
from loraprune.masks import prune_count
from loraprune.structures import StructureGroup


def pruned_config(heads: int, kv_heads: int, width: int, shapes: list[tuple[int, int, int]] | None):
    """A config like compact() writes: the original global counts plus a per-layer plan."""
    plan = None
    if shapes is not None:
        plan = [
            {
                "num_attention_heads": q,
                "num_key_value_heads": kv,
                "intermediate_size": m,
                "kept_heads": list(range(q)),
                "kept_kv_heads": list(range(kv)),
                "kept_channels": list(range(m)),
            }
            for q, kv, m in shapes
        ]
    return SimpleNamespace(
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=width,
        num_hidden_layers=len(shapes) if shapes else 3,
        pruned_layers=plan,
    )


def kept(units: int, ratio: float, blocks: int = 1, round_to: int = 1) -> int:
    group = StructureGroup(0, "mlp", units, (), blocks=blocks, round_to=round_to)
    return units - prune_count(group, ratio)


def test_architectures_are_the_ones_compact_writes():
    # Granite is saved as (and served as) LLaMA
    assert ARCHITECTURES == (
        "PrunedLlamaForCausalLM",
        "PrunedMistralForCausalLM",
        "PrunedQwen2ForCausalLM",
        "PrunedQwen3ForCausalLM",
        "PrunedGemma2ForCausalLM",
        "PrunedGemma3ForCausalLM",
        "PrunedSmolLM3ForCausalLM",
        "PrunedPhi3ForCausalLM",
        "PrunedOlmo2ForCausalLM",
        "PrunedOlmo3ForCausalLM",
    )


def test_layer_shapes_of_a_dense_config_repeat_the_global_counts():
    config = pruned_config(32, 8, 11008, None)
    assert layer_shapes(config) == [(32, 8, 11008)] * 3


@pytest.mark.parametrize("tp_size", [1, 2, 4, 8])
def test_dense_and_halved_llama_7b_shapes_split(tp_size):
    check_tensor_parallel(pruned_config(32, 32, 11008, None), tp_size)
    # 50%: 16 heads, 5504 channels, first and last layers dense
    halved = [(32, 32, 11008), (16, 16, 5504), (16, 16, 5504), (32, 32, 11008)]
    check_tensor_parallel(pruned_config(32, 32, 11008, halved), tp_size)


def test_mha_head_count_that_does_not_split_names_the_layer_and_a_ratio():
    heads = kept(32, 0.2)  # 26
    config = pruned_config(32, 32, 11008, [(32, 32, 11008), (heads, heads, 8832)])
    check_tensor_parallel(config, 2)
    with pytest.raises(ValueError, match="tensor parallel size 4") as info:
        check_tensor_parallel(config, 4)
    message = str(info.value)
    assert "layer 1: 26 query heads / 26 KV heads" in message
    assert "layer 0" not in message
    # The suggested ratio really keeps a multiple of 4 heads.
    assert "e.g. --ratio 0.25 keeps 24" in message
    assert kept(32, 0.25) % 4 == 0


def test_gqa_kv_groups_that_do_not_split_suggest_q_head():
    kv = kept(8, 0.2)  # kv_group unit: 6 of 8 KV groups, 24 query heads
    config = pruned_config(32, 8, 14336, [(kv * 4, kv, 11520)])
    check_tensor_parallel(config, 2)
    with pytest.raises(ValueError, match=r"layer 0: 24 query heads / 6 KV heads.*--gqa-unit q_head"):
        check_tensor_parallel(config, 4)
    # What q_head gives at the same ratio: all 8 KV heads, the same query heads per KV head.
    q = kept(32, 0.2, blocks=8)
    check_tensor_parallel(pruned_config(32, 8, 14336, [(q, 8, 11520)]), 8)


def test_replicated_kv_heads_need_whole_query_heads_per_rank():
    # 2 KV heads over 4 ranks are replicated; 2·3 query heads cannot be split in 4.
    config = pruned_config(16, 2, 4096, [(6, 2, 2048)])
    with pytest.raises(
        ValueError, match=r"--gqa-unit q_head.*a multiple of 2 of the 8 query heads per KV head"
    ):
        check_tensor_parallel(config, 4)
    check_tensor_parallel(pruned_config(16, 2, 4096, [(8, 2, 2048)]), 4)


def test_mlp_width_that_does_not_split_suggests_round_to():
    width = kept(11008, 0.2)  # 8806
    config = pruned_config(32, 32, 11008, [(16, 16, width)])
    with pytest.raises(ValueError, match=f"layer 0: MLP width {width} .*--round-to 4") as info:
        check_tensor_parallel(config, 4)
    assert "query heads" not in str(info.value)
    rounded = kept(11008, 0.2, round_to=128)
    check_tensor_parallel(pruned_config(32, 32, 11008, [(16, 16, rounded)]), 8)


def test_every_bad_layer_is_listed():
    config = pruned_config(8, 8, 64, [(8, 8, 64), (5, 5, 64), (8, 8, 63)])
    with pytest.raises(ValueError) as info:
        check_tensor_parallel(config, 2)
    message = str(info.value)
    assert "layer 1: 5 query heads" in message and "layer 2: MLP width 63" in message


def test_an_unpruned_model_that_does_not_split_says_so():
    with pytest.raises(ValueError, match="the unpruned model's 6 heads / 3 KV heads do not split either"):
        check_tensor_parallel(pruned_config(6, 3, 1024, [(6, 3, 1024)]), 2)


@pytest.mark.parametrize("tp_size", [0, -2, 1.0, True])
def test_bad_tp_size_is_rejected(tp_size):
    with pytest.raises(ValueError, match="tp_size"):
        check_tensor_parallel(pruned_config(8, 8, 64, None), tp_size)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_register_without_vllm_says_how_to_install():
    with pytest.raises(ImportError, match=r"loraprune\[vllm\]"):
        register()


def test_layer_config_is_one_layer_of_a_compacted_model():
    from tiny_models import tiny_model

    from loraprune import LoraPruneConfig, LoraPruner

    pruner = LoraPruner(tiny_model("llama-gqa-tied", layers=3), LoraPruneConfig(ratio=0.5, layers=(1,)))
    pruner.set_group_mask(0, torch.tensor([True, False]))  # layer 1: one of two KV groups
    pruner.set_group_mask(1, torch.arange(40) % 4 == 0)  # layer 1: 10 of 40 channels
    config = pruner.compact().config
    view = layer_config(config, 1, qkv_bias=True)
    assert (view.num_attention_heads, view.num_key_value_heads, view.intermediate_size) == (3, 1, 10)
    assert view.head_dim == 8 and view.qkv_bias  # pinned: hidden_size // 3 heads would be 16
    assert (view.hidden_size, view.vocab_size) == (config.hidden_size, config.vocab_size)
    dense = layer_config(config, 0)
    assert (dense.num_attention_heads, dense.num_key_value_heads, dense.intermediate_size) == (6, 2, 40)
    # the model's own config is left as it was
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (6, 2, 40)
    assert not hasattr(config, "qkv_bias")
