"""Granite (IBM Granite 3.x dense): LLaMA plus four scalar multipliers, saved as a plain ``loraprune_llama``.

Pruning runs on transformers' own Granite model; compaction folds the multipliers into the
weights (:mod:`.fold`), so the pruned checkpoint is LLaMA-shaped and every engine that serves
``loraprune_llama`` serves it. A dense Granite has no GGUF here: compact it first (``--ratio 0``).
"""

from loraprune.families.base import Family
from loraprune.families.granite.fold import fold_granite
from loraprune.families.llama import FAMILY as LLAMA


def gguf_architecture(config: dict) -> str:
    raise ValueError(
        "model_dir: a dense Granite checkpoint has no GGUF export here: llama.cpp's deci would ignore its "
        "embedding, attention, residual and logits multipliers; prune it (--ratio 0 keeps every unit), "
        "which folds them into a loraprune_llama checkpoint, and export that"
    )


FAMILY = Family(
    model_type="granite",
    pruned_classes=LLAMA.pruned_classes,
    gguf_architecture=gguf_architecture,
    vllm_model=LLAMA.vllm_model,
    fold=fold_granite,
)
