"""Gemma 3, text only (``gemma3_text``: Gemma 3 1B, 270M, and the language model of the larger ones).

Gemma 2's layer (four (1 + w) RMSNorms over the hidden size, √hidden-scaled tied embeddings, GeGLU
MLP, scores scaled by ``query_pre_attn_scalar ** -0.5``, head_dim decoupled from hidden/heads,
sliding-window layers between global ones, each kind with its own RoPE base) plus q_norm/k_norm:
(1 + w) RMSNorms over head_dim whose weights every head shares, as Qwen3's. Nothing of these is
sliced with a head or a channel: the pruned model is transformers' own Gemma3ForCausalLM with
resized projections.

A multimodal Gemma 3 (``gemma3``: 4B and larger, a SigLIP vision tower beside the language model,
whose layers are under ``model.language_model``) is refused with the way out (:data:`REFUSED`):
``python -m loraprune.families.gemma3 MODEL_DIR OUT_DIR`` saves its language model alone as a
``gemma3_text`` checkpoint (:mod:`.text_model`), which is pruned as any other.

llama.cpp: its ``gemma3`` architecture builds every layer with one head count and MLP width, and
none of its per-layer architectures (``deci``, ``openelm``) has the post-norms and GeGLU: no GGUF
export. vLLM: its own Gemma 3 layers, one config view per layer (:mod:`.vllm_model`).
"""

from loraprune.families.base import Family
from loraprune.models import PRUNED_CLASSES

# model_type -> why loraprune does not prune it, and what to do instead
REFUSED = {
    "gemma3": (
        "a multimodal Gemma 3 (a vision tower beside the language model, whose layers are under "
        "model.language_model) is not pruned here, only text-only causal LMs are; save its language model "
        "as a text-only Gemma 3 (gemma3_text, the vision tower left out) with "
        "`python -m loraprune.families.gemma3 MODEL_DIR OUT_DIR` and prune OUT_DIR"
    ),
}


def gguf_architecture(config: dict) -> str:
    raise ValueError(
        "model_dir: a Gemma 3 checkpoint has no GGUF export here: llama.cpp's gemma3 architecture builds "
        "every layer with one head count and MLP width, and none of its per-layer architectures (deci, "
        "openelm) has Gemma's post-attention and post-MLP norms and GeGLU MLP; serve the pruned model with "
        "transformers or vLLM (a dense Gemma 3 converts with llama.cpp's own convert_hf_to_gguf.py)"
    )


FAMILY = Family(
    model_type="gemma3_text",
    pruned_classes=PRUNED_CLASSES["gemma3_text"],
    gguf_architecture=gguf_architecture,
    vllm_model="loraprune.families.gemma3.vllm_model:PrunedGemma3ForCausalLM",
)
