"""Phi-3 and Phi-4 (``phi3``; Phi-4 checkpoints use it too): LLaMA's computation with fused matrices.

``qkv_proj`` rows are [q | k | v] and ``gate_up_proj`` rows [gate | up] (``up · silu(gate)``), so a KV
group owns three row ranges of one matrix and a channel two. While pruning, each fused matrix is split
into LLaMA's projections (:mod:`loraprune.fused`; a PEFT adapter on it splits exactly), and compaction
fuses them again. Phi3Attention splits qkv at the config's global head count, so the pruned class
(``loraprune_phi3``) reads each layer's own counts.

llama.cpp: ``deci`` with the split tensors computes Phi-3 exactly where its RoPE is the default one
over the whole head (``partial_rotary_factor`` 1, no rope scaling: Phi-3-mini 4k, Phi-4). longrope
(Phi-3 128k, Phi-3.5, Phi-4-mini) and partial rotation (Phi-4-mini) are refused. vLLM: LLaMA's model
with Phi-3's packed-module mapping (its loader splits each fused matrix by the layer's own counts).
"""

from loraprune.families.base import VLLM_MODELS_MODULE, Family, FusedRows
from loraprune.models import PRUNED_CLASSES

FUSED = (
    FusedRows("self_attn.qkv_proj", (("q_proj", "heads"), ("k_proj", "kv_heads"), ("v_proj", "kv_heads"))),
    FusedRows("mlp.gate_up_proj", (("gate_proj", "channels"), ("up_proj", "channels"))),
)


def gguf_architecture(config: dict) -> str:
    params = config.get("rope_parameters") or {**(config.get("rope_scaling") or {})}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ValueError(
            f"model_dir: a Phi-3 with rope_type {rope_type!r} has no GGUF export: llama.cpp's deci applies one "
            "fixed set of RoPE frequencies, while longrope switches between short and long factors with the "
            "context length and scales the attention (Phi-3 128k, Phi-3.5, Phi-4-mini); only the default RoPE "
            "(Phi-3-mini 4k, Phi-4) is exported"
        )
    partial = float(params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)))
    if partial != 1.0:
        raise ValueError(
            f"model_dir: a Phi-3 with partial_rotary_factor {partial:g} has no GGUF export: llama.cpp's deci "
            "rotates whole heads, this model the first part of each head only"
        )
    return "deci"


FAMILY = Family(
    model_type="phi3",
    pruned_classes=PRUNED_CLASSES["phi3"],
    gguf_architecture=gguf_architecture,
    vllm_model=f"{VLLM_MODELS_MODULE}:PrunedPhi3ForCausalLM",
    fused=FUSED,
)
