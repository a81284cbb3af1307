"""OLMo 3 (``olmo3``): OLMo 2's layer (q_norm/k_norm over the whole q/k width, rewritten exactly at
compaction: :mod:`loraprune.families.olmo2`) with sliding-window attention in most layers
(``layer_types``) and RoPE settings per layer type.

No GGUF, for OLMo 2's reasons (llama.cpp's ``olmo2``/``olmo3`` read one global head count).
"""

from loraprune.families.base import VLLM_MODELS_MODULE, Family
from loraprune.families.olmo2 import PASSIVE
from loraprune.models import PRUNED_CLASSES


def gguf_architecture(config: dict) -> str:
    raise ValueError(
        "model_dir: OLMo 3 has no GGUF export: llama.cpp's olmo2/olmo3 architectures read one global head "
        "count and derive head_dim as hidden/heads, so they cannot hold a pruned layer's own widths, and "
        "deci (per-layer counts) has no q/k norms or sliding windows"
    )


FAMILY = Family(
    model_type="olmo3",
    pruned_classes=PRUNED_CLASSES["olmo3"],
    gguf_architecture=gguf_architecture,
    vllm_model=f"{VLLM_MODELS_MODULE}:PrunedOlmo3ForCausalLM",
    passive=PASSIVE,
)
