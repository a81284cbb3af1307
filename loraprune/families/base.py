"""What loraprune needs to know about a model family, in one description per family.

A :class:`Family` names where the decoder layers are, the seven projections of a layer (the
member matrices of its attention and MLP structures), the classes a pruned model of the family is
saved as, how its checkpoint becomes that class (``fold``: for families saved as another one),
which llama.cpp architecture its GGUF file uses (or why it has none), and which vLLM model class
serves it. Each family lives in its own folder beside this file; :mod:`loraprune.families`
collects them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

# (projection name, path inside a decoder layer): Hugging Face's LLaMA layout, one matrix each.
LLAMA_PROJECTIONS: tuple[tuple[str, str], ...] = (
    ("q_proj", "self_attn.q_proj"),
    ("k_proj", "self_attn.k_proj"),
    ("v_proj", "self_attn.v_proj"),
    ("o_proj", "self_attn.o_proj"),
    ("gate_proj", "mlp.gate_proj"),
    ("up_proj", "mlp.up_proj"),
    ("down_proj", "mlp.down_proj"),
)
VLLM_MODELS_MODULE = "loraprune.integrations.vllm_models"

# (compacted model, config dict of the saved class, popped of what the fold absorbs) -> its state dict
Fold = Callable[[nn.Module, dict], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Family:
    """One model family: a dense ``model_type`` and everything that prunes, saves and serves it."""

    model_type: str
    # (config class, model class) of the pruned checkpoint: ``loraprune_<family>`` (or another family's)
    pruned_classes: tuple[type, type]
    # config dict of a checkpoint -> llama.cpp architecture its GGUF uses; raises ValueError saying why not
    gguf_architecture: Callable[[dict], str]
    # "module:Class" of the vLLM model that serves the pruned classes
    vllm_model: str
    layers: str = "model.layers"
    projections: tuple[tuple[str, str], ...] = LLAMA_PROJECTIONS
    # None: the pruned class is the family's own class, and compaction swaps the class in place
    fold: Fold | None = None

    @property
    def pruned_model_type(self) -> str:
        return self.pruned_classes[0].model_type


def deci(config: dict) -> str:
    """llama.cpp's ``deci``: LLaMA's computation with per-layer head, KV-head and MLP counts."""
    return "deci"
