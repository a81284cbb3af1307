"""Small random models of the supported families, and helpers to give LoRA non-trivial values."""

from __future__ import annotations

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}

# (family, query heads, KV heads, tied embeddings): MHA and GQA, tied and untied, with and without bias.
# head_dim is hidden/heads: transformers 4.x ignores config.head_dim for some families.
CONFIGS = {
    "llama-mha-untied": ("llama", 4, 4, False),
    "llama-gqa-tied": ("llama", 6, 2, True),
    "mistral-gqa": ("mistral", 4, 2, False),
    "qwen2-gqa-bias-tied": ("qwen2", 4, 2, True),
}


def tiny_model(
    name: str = "llama-mha-untied", layers: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    family, heads, kv_heads, tied = CONFIGS[name]
    config_cls, model_cls = FAMILIES[family]
    config = config_cls(
        vocab_size=96,
        hidden_size=48,
        intermediate_size=40,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=48 // heads,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype).eval()
    randomize_weights(model)
    return model


def randomize_weights(model: torch.nn.Module, std: float = 0.2) -> None:
    """Matrices and biases ~ N(0, std), Qwen3's q/k norm weights ~ N(1, std), in parameter order.

    HF's 0.02 init gives near-uniform logits that hide mistakes.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2 or name.endswith("bias"):
                param.normal_(0, std)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                param.normal_(1, std)


def aligned_model(family: str = "llama", seed: int = 0, vocab: int = 96) -> torch.nn.Module:
    """A random GQA model whose widths are multiples of nf4's 64-element block (as real models are)."""
    config_cls, model_cls = FAMILIES[family]
    config = config_cls(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=192,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    randomize_weights(model, std=0.1)
    return model


def randomize_lora(model: torch.nn.Module, seed: int = 1) -> None:
    """Non-zero B (and fresh A) so that merges and LoRA paths are exercised."""
    from loraprune.nn import lora_modules

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora_modules(model).values():
            if module.lora_A is not None:
                module.lora_A.copy_(torch.randn(module.lora_A.shape, generator=generator) * 0.3)
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=generator) * 0.3)


def random_tokens(batch: int = 2, length: int = 12, vocab: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def pruned_by_magnitude(model: torch.nn.Module, ratio: float, **options) -> torch.nn.Module:
    """``model`` compacted after one magnitude-ranked pruning step (fast, deterministic)."""
    from loraprune import LoraPruneConfig, LoraPruner

    pruner = LoraPruner(model, LoraPruneConfig(ratio=ratio, criterion="magnitude", **options))
    pruner.update_scores()
    pruner.prune()
    return pruner.compact().eval()


def pruned_tiny_model(name: str = "llama-mha-untied", ratio: float = 0.5) -> torch.nn.Module:
    """A compacted tiny model: layers 0-2 lose ``ratio`` of their heads and channels, layer 3 stays whole."""
    return pruned_by_magnitude(tiny_model(name), ratio, layers=(0, 1, 2))


def biased_llama(layers: int = 3) -> torch.nn.Module:
    """A tiny LLaMA whose o_proj and down_proj carry biases (attention_bias, mlp_bias)."""
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=48,
        intermediate_size=40,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        max_position_embeddings=64,
        attention_bias=True,
        mlp_bias=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    randomize_weights(model)
    return model
