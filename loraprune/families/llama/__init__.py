"""LLaMA (Llama 2/3.x, SmolLM2 and other checkpoints that load as ``llama``)."""

from loraprune.families.base import VLLM_MODELS_MODULE, Family, deci
from loraprune.models import PRUNED_CLASSES

FAMILY = Family(
    model_type="llama",
    pruned_classes=PRUNED_CLASSES["llama"],
    gguf_architecture=deci,
    vllm_model=f"{VLLM_MODELS_MODULE}:PrunedLlamaForCausalLM",
)
