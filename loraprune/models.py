"""Hugging Face classes for pruned models, registered with the Auto classes on ``import loraprune``.

A pruned checkpoint is an ordinary safetensors checkpoint whose config has ``model_type``
``loraprune_<family>`` and a ``pruned_layers`` plan: per decoder layer, the head, KV-head and
channel counts and the kept indices in the original model's numbering. The model classes are
the family's own ``*ForCausalLM`` with each layer's projections resized to that plan, so
``AutoModelForCausalLM.from_pretrained(dir)`` loads one and ``generate()`` works.

The classes live in two self-contained files (:mod:`loraprune.configuration_loraprune`,
:mod:`loraprune.modeling_loraprune`) that ``save_pretrained`` copies beside the weights, with an
``auto_map`` in ``config.json``: where loraprune is not installed, the checkpoint loads with
``trust_remote_code=True``.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from loraprune.configuration_loraprune import (
    PrunedGemma2Config,
    PrunedGemma3TextConfig,
    PrunedLlamaConfig,
    PrunedMistralConfig,
    PrunedOlmo2Config,
    PrunedOlmo3Config,
    PrunedPhi3Config,
    PrunedQwen2Config,
    PrunedQwen3Config,
    PrunedSmolLM3Config,
)
from loraprune.modeling_loraprune import (
    PLAN_KEYS,
    PrunedGemma2ForCausalLM,
    PrunedGemma3ForCausalLM,
    PrunedLlamaForCausalLM,
    PrunedMistralForCausalLM,
    PrunedOlmo2ForCausalLM,
    PrunedOlmo3ForCausalLM,
    PrunedPhi3ForCausalLM,
    PrunedQwen2ForCausalLM,
    PrunedQwen3ForCausalLM,
    PrunedSmolLM3ForCausalLM,
    resize_layer,
    set_attention_heads,
    validate_plan,
)

__all__ = [
    "PLAN_KEYS",
    "PRUNED_CLASSES",
    "register_auto_classes",
    "resize_layer",
    "set_attention_heads",
    "validate_plan",
]

PRUNED_CLASSES: dict[str, tuple[type, type]] = {
    "llama": (PrunedLlamaConfig, PrunedLlamaForCausalLM),
    "mistral": (PrunedMistralConfig, PrunedMistralForCausalLM),
    "qwen2": (PrunedQwen2Config, PrunedQwen2ForCausalLM),
    "qwen3": (PrunedQwen3Config, PrunedQwen3ForCausalLM),
    "phi3": (PrunedPhi3Config, PrunedPhi3ForCausalLM),
    "olmo2": (PrunedOlmo2Config, PrunedOlmo2ForCausalLM),
    "olmo3": (PrunedOlmo3Config, PrunedOlmo3ForCausalLM),
    "gemma2": (PrunedGemma2Config, PrunedGemma2ForCausalLM),
    "gemma3_text": (PrunedGemma3TextConfig, PrunedGemma3ForCausalLM),
    "smollm3": (PrunedSmolLM3Config, PrunedSmolLM3ForCausalLM),
}


def register_auto_classes() -> None:
    """Load pruned checkpoints through the Auto classes, and have ``save_pretrained`` write the class files."""
    for config_cls, model_cls in PRUNED_CLASSES.values():
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
        config_cls.register_for_auto_class("AutoConfig")
        model_cls.register_for_auto_class("AutoModelForCausalLM")
