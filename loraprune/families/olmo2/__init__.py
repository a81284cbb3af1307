"""OLMo 2 (``olmo2``): LLaMA's projections, no pre-norms but RMSNorms after attention and MLP, and
q_norm/k_norm over the whole q/k width (num_heads·head_dim), not per head.

A masked head's q rows are 0, which the norm still averages over: the pruned layer's norm must keep
dividing by the full width N. Compaction slices the norm weights with the kept heads (passive tensors)
and rewrites them exactly: weight·√(N/K) and eps·N/K (K: the kept width), since
``x/√(Σx²/N + ε) = √(N/K)·x/√(Σx²/K + ε·N/K)``; the per-layer eps goes into the plan (``norm_eps``).

llama.cpp: no GGUF (its ``olmo2`` architecture reads one global head count and derives head_dim as
hidden/heads; ``deci`` has no q/k norms). vLLM 0.32 serves OLMo 2 only through its transformers
backend (no model of its own, and one head count for every layer): loraprune brings an OLMo 2 model
built from vLLM's layers with each layer's widths and norm eps.
"""

from loraprune.families.base import VLLM_MODELS_MODULE, Family, Passive
from loraprune.models import PRUNED_CLASSES

PASSIVE = (
    Passive("self_attn.q_norm", "heads", rms_over_width=True),
    Passive("self_attn.k_norm", "kv_heads", rms_over_width=True),
)


def gguf_architecture(config: dict) -> str:
    raise ValueError(
        "model_dir: OLMo 2 has no GGUF export: llama.cpp's olmo2 architecture reads one global head count "
        "and derives head_dim as hidden/heads, so it cannot hold a pruned layer's own widths, and deci "
        "(per-layer counts) has no q/k norms"
    )


FAMILY = Family(
    model_type="olmo2",
    pruned_classes=PRUNED_CLASSES["olmo2"],
    gguf_architecture=gguf_architecture,
    vllm_model=f"{VLLM_MODELS_MODULE}:PrunedOlmo2ForCausalLM",
    passive=PASSIVE,
)
