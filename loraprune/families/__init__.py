"""The registry of model families loraprune prunes: one description per family, each in its own folder.

A dense checkpoint is looked up by its ``model_type``; a pruned one (``loraprune_<family>``) by the
family it is saved as. Adding a family is a folder with a :class:`Family` and a line below.
"""

from __future__ import annotations

from loraprune.families import (
    gemma2,
    gemma3,
    granite,
    llama,
    mistral,
    olmo2,
    olmo3,
    phi3,
    qwen2,
    qwen3,
    smollm3,
)
from loraprune.families.base import Family

__all__ = [
    "FAMILIES",
    "PRUNED_MODEL_TYPE_PREFIX",
    "REFUSED",
    "SUPPORTED_MODEL_TYPES",
    "Family",
    "family",
]

PRUNED_MODEL_TYPE_PREFIX = "loraprune_"
FAMILIES: dict[str, Family] = {
    module.FAMILY.model_type: module.FAMILY
    for module in (llama, mistral, qwen2, granite, qwen3, gemma2, gemma3, smollm3, phi3, olmo2, olmo3)
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
# model_type -> why it is not pruned and what to do instead (a family's relative that it does not cover)
REFUSED: dict[str, str] = {**gemma3.REFUSED}


def family(model_type: str, name: str = "model", where: str = "config.model_type") -> Family:
    """The family of a ``model_type`` (dense, or ``loraprune_<family>``); raises naming ``name`` and ``where``."""
    base = str(model_type).removeprefix(PRUNED_MODEL_TYPE_PREFIX)
    if base in REFUSED:
        raise ValueError(f"{name}: {model_type!r} ({where}): {REFUSED[base]}")
    if base not in FAMILIES:
        raise ValueError(
            f"{name}: unsupported architecture {model_type!r} ({where}); supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return FAMILIES[base]
