"""What loraprune needs to know about a model family, in one description per family.

A :class:`Family` names where the decoder layers are, the seven projections of a layer (the
member matrices of its attention and MLP structures), the classes a pruned model of the family is
saved as, how its checkpoint becomes that class (``fold``: for families saved as another one),
which llama.cpp architecture its GGUF file uses (or why it has none), and which vLLM model class
serves it; where the family has them, its fused matrices (:class:`FusedRows`: one matrix holding
several projections' rows, split into separate members while pruning) and its passive tensors
(:class:`Passive`: tensors sliced with a unit, such as a norm over a projection's rows). Each family lives in its own folder beside this file; :mod:`loraprune.families`
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

# The kinds of unit a projection's rows (or a passive tensor) belong to, and the plan count of each.
UNIT_COUNTS = {
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "channels": "intermediate_size",
}


@dataclass(frozen=True)
class FusedRows:
    """One matrix of a decoder layer whose rows are several projections' rows, one segment after the
    other (Phi-3's ``qkv_proj``: [q | k | v]; ``gate_up_proj``: [gate | up]).

    While a model is pruned the matrix is split into its members (:mod:`loraprune.fused`): each is
    an ``nn.Linear`` beside it, in the same parent module, at the path the family's ``projections``
    name, and the fused module becomes a view computing their concatenation; compaction fuses the
    (pruned) members into one matrix again. A segment's width is its unit count in that layer (the
    plan's, or the config's for a dense model) times the unit's width (head_dim for heads, 1 for
    channels).
    """

    path: str  # inside a decoder layer, e.g. "self_attn.qkv_proj"
    members: tuple[tuple[str, str], ...]  # (projection name, unit kind of UNIT_COUNTS), in row order


@dataclass(frozen=True)
class Passive:
    """A module of a decoder layer whose 1-D ``weight`` has one entry per row of a projection's units,
    sliced with them at compaction (OLMo 2's q_norm/k_norm over the q/k rows).

    ``rms_over_width``: the module is an RMSNorm over the whole sliced width (mean over N entries),
    so that removing rows changes its statistic; compaction keeps its computation exact by scaling
    the weight by √(N/K) and its ``variance_epsilon`` by N/K (K: kept width), and records the new
    eps in the plan (``norm_eps``), which the saved classes read.
    """

    path: str  # inside a decoder layer, e.g. "self_attn.q_norm"
    unit: str  # kind of UNIT_COUNTS
    rms_over_width: bool = False


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
    # matrices holding several projections' rows, split while pruning (see FusedRows)
    fused: tuple[FusedRows, ...] = ()
    # tensors sliced with a unit at compaction (see Passive)
    passive: tuple[Passive, ...] = ()

    @property
    def pruned_model_type(self) -> str:
        return self.pruned_classes[0].model_type


def deci(config: dict) -> str:
    """llama.cpp's ``deci``: LLaMA's computation with per-layer head, KV-head and MLP counts."""
    return "deci"
