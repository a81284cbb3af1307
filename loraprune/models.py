"""Hugging Face classes for pruned models, registered with the Auto classes on ``import loraprune``.

A pruned checkpoint is an ordinary safetensors checkpoint whose config has ``model_type``
``loraprune_<family>`` and a ``pruned_layers`` plan: per decoder layer, the head, KV-head and
channel counts and the kept indices in the original model's numbering. The model classes are
the family's own ``*ForCausalLM`` with each layer's projections resized to that plan, so
``AutoModelForCausalLM.from_pretrained(dir)`` loads one and ``generate()`` works.
"""

from __future__ import annotations

from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from loraprune.structures import PRUNED_MODEL_TYPE_PREFIX, decoder_layers, head_dim, projection_paths

PLAN_KEYS = (
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "kept_heads",
    "kept_kv_heads",
    "kept_channels",
)


class PrunedModelMixin:
    """Resizes each decoder layer to ``config.pruned_layers`` right after the family's constructor."""

    def __init__(self, config, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        plan = validate_plan(config.pruned_layers, config.num_hidden_layers)
        for index, entry in enumerate(plan):
            resize_layer(
                self,
                index,
                entry["num_attention_heads"],
                entry["num_key_value_heads"],
                entry["intermediate_size"],
            )


class PrunedLlamaConfig(LlamaConfig):
    model_type = PRUNED_MODEL_TYPE_PREFIX + "llama"


class PrunedLlamaForCausalLM(PrunedModelMixin, LlamaForCausalLM):
    config_class = PrunedLlamaConfig


class PrunedMistralConfig(MistralConfig):
    model_type = PRUNED_MODEL_TYPE_PREFIX + "mistral"


class PrunedMistralForCausalLM(PrunedModelMixin, MistralForCausalLM):
    config_class = PrunedMistralConfig


class PrunedQwen2Config(Qwen2Config):
    model_type = PRUNED_MODEL_TYPE_PREFIX + "qwen2"


class PrunedQwen2ForCausalLM(PrunedModelMixin, Qwen2ForCausalLM):
    config_class = PrunedQwen2Config


PRUNED_CLASSES: dict[str, tuple[type, type]] = {
    "llama": (PrunedLlamaConfig, PrunedLlamaForCausalLM),
    "mistral": (PrunedMistralConfig, PrunedMistralForCausalLM),
    "qwen2": (PrunedQwen2Config, PrunedQwen2ForCausalLM),
}


def register_auto_classes() -> None:
    for config_cls, model_cls in PRUNED_CLASSES.values():
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)


def validate_plan(plan: object, num_layers: int) -> list[dict]:
    if not isinstance(plan, list) or len(plan) != num_layers:
        raise ValueError(
            f"config.pruned_layers must list {num_layers} layers, got {type(plan).__name__} "
            f"of length {len(plan) if isinstance(plan, list) else '-'}"
        )
    for index, entry in enumerate(plan):
        missing = [k for k in PLAN_KEYS if k not in entry]
        if missing:
            raise ValueError(f"config.pruned_layers[{index}] lacks {missing}")
        counts = {k: entry[k] for k in PLAN_KEYS[:3]}
        if any(not isinstance(v, int) or v < 1 for v in counts.values()):
            raise ValueError(f"config.pruned_layers[{index}]: counts must be positive integers, got {counts}")
        if entry["num_attention_heads"] % entry["num_key_value_heads"]:
            raise ValueError(
                f"config.pruned_layers[{index}]: {entry['num_attention_heads']} heads do not split "
                f"into {entry['num_key_value_heads']} KV groups"
            )
        for key, count in (
            ("kept_heads", "num_attention_heads"),
            ("kept_kv_heads", "num_key_value_heads"),
            ("kept_channels", "intermediate_size"),
        ):
            if len(entry[key]) != entry[count]:
                raise ValueError(
                    f"config.pruned_layers[{index}]: {key} has {len(entry[key])} entries, "
                    f"{count} is {entry[count]}"
                )
    return plan


def set_attention_heads(attention: nn.Module, num_heads: int, num_kv_heads: int) -> None:
    """Keep an attention module's head bookkeeping consistent with resized projections."""
    attention.num_key_value_groups = num_heads // num_kv_heads
    # transformers 4.x reads these in forward (Qwen2 reshapes its output to ``hidden_size``)
    legacy = {
        "num_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "hidden_size": num_heads * attention.head_dim,
    }
    for name, value in legacy.items():
        if hasattr(attention, name):
            setattr(attention, name, value)


def resize_layer(
    model: nn.Module, layer: int, num_heads: int, num_kv_heads: int, intermediate_size: int
) -> None:
    """Replace a layer's projections by uninitialised ones of the pruned sizes (before loading weights)."""
    dim = head_dim(model)
    paths = projection_paths(model, layer)
    widths = {
        "q_proj": ("out", num_heads * dim),
        "k_proj": ("out", num_kv_heads * dim),
        "v_proj": ("out", num_kv_heads * dim),
        "o_proj": ("in", num_heads * dim),
        "gate_proj": ("out", intermediate_size),
        "up_proj": ("out", intermediate_size),
        "down_proj": ("in", intermediate_size),
    }
    for name, (axis, width) in widths.items():
        old = model.get_submodule(paths[name])
        in_features = width if axis == "in" else old.in_features
        out_features = width if axis == "out" else old.out_features
        if (in_features, out_features) != (old.in_features, old.out_features):
            model.set_submodule(
                paths[name],
                nn.Linear(
                    in_features,
                    out_features,
                    bias=old.bias is not None,
                    device=old.weight.device,
                    dtype=old.weight.dtype,
                ),
            )
    set_attention_heads(decoder_layers(model)[layer].self_attn, num_heads, num_kv_heads)
