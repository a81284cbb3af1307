"""Qwen2 (and Qwen2.5): LLaMA's layout with q/k/v biases (llama.cpp's deci reads them as such)."""

from loraprune.families.base import VLLM_MODELS_MODULE, Family, deci
from loraprune.models import PRUNED_CLASSES

FAMILY = Family(
    model_type="qwen2",
    pruned_classes=PRUNED_CLASSES["qwen2"],
    gguf_architecture=deci,
    vllm_model=f"{VLLM_MODELS_MODULE}:PrunedQwen2ForCausalLM",
)
