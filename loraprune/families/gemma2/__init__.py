"""Gemma 2: LLaMA's seven projections in a layer that computes differently around them.

head_dim (256 in the released models) is decoupled from hidden/heads; scores are scaled by
``query_pre_attn_scalar ** -0.5`` and soft-capped (``attn_logit_softcapping``), as are the final
logits (``final_logit_softcapping``); sliding-window and global layers alternate; each layer has
four (1 + w) RMSNorms over the hidden size (before and after attention, before and after the
MLP); the embeddings are scaled by √hidden and tied to the output; the MLP is GeGLU (tanh GELU).
None of these is sliced with a head or a channel: a pruned layer keeps them as they are, and the
pruned model is transformers' own Gemma2ForCausalLM with resized projections.

llama.cpp: its ``gemma2`` architecture builds every layer with one head count and MLP width, and
none of its per-layer architectures (``deci``, ``openelm``) has the post-norms, GeGLU and
soft-capping, so there is no GGUF export. vLLM: its own Gemma 2 layers, one config view per layer
(:mod:`.vllm_model`).
"""

from loraprune.families.base import Family
from loraprune.models import PRUNED_CLASSES


def gguf_architecture(config: dict) -> str:
    raise ValueError(
        "model_dir: a Gemma 2 checkpoint has no GGUF export here: llama.cpp's gemma2 architecture builds "
        "every layer with one head count and MLP width, and none of its per-layer architectures (deci, "
        "openelm) has Gemma's post-attention and post-MLP norms, GeGLU MLP and logit soft-capping; serve "
        "the pruned model with transformers or vLLM (a dense Gemma 2 converts with llama.cpp's own "
        "convert_hf_to_gguf.py)"
    )


FAMILY = Family(
    model_type="gemma2",
    pruned_classes=PRUNED_CLASSES["gemma2"],
    gguf_architecture=gguf_architecture,
    vllm_model="loraprune.families.gemma2.vllm_model:PrunedGemma2ForCausalLM",
)
