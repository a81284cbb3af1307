"""Qwen3 (dense): LLaMA's layout plus q_norm/k_norm, RMSNorms over head_dim whose weights every head
shares (nothing to slice: a kept head is normalised as before, a masked one is exactly 0); head_dim
may differ from hidden/heads.

llama.cpp's ``qwen3`` architecture reads one global head count; its ``openelm`` builds each layer
from per-layer counts with a fused qkv, per-head q/k norms and NEOX (rotate-half) RoPE, and always
ties the output to the token embedding: it computes a pruned Qwen3 whose embeddings are tied
(Qwen3 0.6B, 1.7B, 4B) exactly.
"""

from loraprune.families.base import VLLM_MODELS_MODULE, Family
from loraprune.models import PRUNED_CLASSES


def gguf_architecture(config: dict) -> str:
    if not config.get("tie_word_embeddings"):
        raise ValueError(
            "model_dir: a Qwen3 with untied embeddings has no GGUF export: llama.cpp's qwen3 architecture "
            "reads one global head count, and openelm, the one with per-layer counts and per-head q/k norms, "
            "ties the output to the token embedding"
        )
    if config.get("attention_bias"):
        raise ValueError(
            "model_dir: attention_bias is not supported in GGUF export (llama.cpp's openelm has no biases)"
        )
    return "openelm"


FAMILY = Family(
    model_type="qwen3",
    pruned_classes=PRUNED_CLASSES["qwen3"],
    gguf_architecture=gguf_architecture,
    vllm_model=f"{VLLM_MODELS_MODULE}:PrunedQwen3ForCausalLM",
)
