"""SmolLM3: LLaMA's layout and computation, except that every ``no_rope_layer_interval``-th layer
(``config.no_rope_layers[i] == 0``) applies no RoPE (NoPE). That is per layer, not per head: a
pruned layer keeps it, and the pruned model is transformers' own SmolLM3ForCausalLM with resized
projections.

llama.cpp: ``deci``, the architecture with per-layer head counts, rotates in every layer, and its
``smollm3`` architecture (which skips RoPE on the NoPE layers) builds every layer with one head
count and MLP width: no GGUF export. vLLM serves SmolLM3 through its Transformers backend; the
pruned model is served by vLLM's own LLaMA layers, one config view per layer, whose attention
skips the rotation on the NoPE layers (:mod:`.vllm_model`).
"""

from loraprune.families.base import Family
from loraprune.models import PRUNED_CLASSES


def gguf_architecture(config: dict) -> str:
    raise ValueError(
        "model_dir: a SmolLM3 checkpoint has no GGUF export here: llama.cpp's deci, the architecture with "
        "per-layer head counts, applies RoPE in every layer, while SmolLM3 applies none in every "
        "no_rope_layer_interval-th layer, and llama.cpp's smollm3 architecture builds every layer with one "
        "head count and MLP width; serve the pruned model with transformers or vLLM (a dense SmolLM3 "
        "converts with llama.cpp's own convert_hf_to_gguf.py)"
    )


FAMILY = Family(
    model_type="smollm3",
    pruned_classes=PRUNED_CLASSES["smollm3"],
    gguf_architecture=gguf_architecture,
    vllm_model="loraprune.families.smollm3.vllm_model:PrunedSmolLM3ForCausalLM",
)
