"""Mistral: LLaMA's layout and computation, with a sliding window (llama.cpp: the window caps the context)."""

from loraprune.families.base import VLLM_MODELS_MODULE, Family, deci
from loraprune.models import PRUNED_CLASSES

FAMILY = Family(
    model_type="mistral",
    pruned_classes=PRUNED_CLASSES["mistral"],
    gguf_architecture=deci,
    vllm_model=f"{VLLM_MODELS_MODULE}:PrunedMistralForCausalLM",
)
