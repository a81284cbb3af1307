"""Granite's four multipliers folded into LLaMA weights (transformers' ``modeling_granite.py``).

Granite computes, where LLaMA has plain sums and ``head_dim ** -0.5``::

    h = embedding_multiplier · E[x]
    h = h + residual_multiplier · o_proj(attn(q, k, v, scaling=attention_multiplier))
    h = h + residual_multiplier · down_proj(mlp(h))
    logits = lm_head(norm(h)) / logits_scaling

All four are linear in one tensor each, so LLaMA computes the same with: the embedding rows times
``embedding_multiplier``; q_proj (rows and bias) times ``attention_multiplier · sqrt(head_dim)``
(RoPE is a rotation, so the factor passes through it); o_proj and down_proj (and their biases)
times ``residual_multiplier``; the final norm's weight divided by ``logits_scaling``, and also by
``embedding_multiplier`` where the output matrix is the (scaled) embedding. The residual stream
keeps Granite's scale, so every RMSNorm (and its eps) sees what it saw in Granite.
"""

from __future__ import annotations

import torch
from torch import nn

MULTIPLIERS = ("embedding_multiplier", "attention_multiplier", "residual_multiplier", "logits_scaling")


def fold_granite(model: nn.Module, config: dict) -> dict[str, torch.Tensor]:
    """The state dict of LLaMA weights computing what the (compacted) Granite ``model`` computes.

    ``config`` is the checkpoint's config dict: the multipliers are popped from it (a LLaMA config
    has none). Scaled tensors are new (computed in fp32, stored in their own dtype); the others
    are ``model``'s own.
    """
    embedding, attention, residual, logits = (float(config.pop(name)) for name in MULTIPLIERS)
    attention_layer = model.model.layers[0].self_attn
    q_scale = attention * attention_layer.head_dim**0.5
    tied = bool(config.get("tie_word_embeddings"))
    factors = {
        "model.embed_tokens.weight": embedding,
        "model.norm.weight": 1 / (logits * (embedding if tied else 1)),
    }
    for index in range(len(model.model.layers)):
        prefix = f"model.layers.{index}"
        for suffix in ("weight", "bias"):
            factors[f"{prefix}.self_attn.q_proj.{suffix}"] = q_scale
            factors[f"{prefix}.self_attn.o_proj.{suffix}"] = residual
            factors[f"{prefix}.mlp.down_proj.{suffix}"] = residual
    state = model.state_dict()
    for name, factor in factors.items():
        if name in state and factor != 1.0:
            tensor = state[name]
            state[name] = (tensor.float() * factor).to(tensor.dtype)
    if tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state
