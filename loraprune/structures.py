"""Model families and their prunable structures (dependency groups).

A :class:`StructureGroup` is one layer's attention heads or MLP channels: ``num_units`` units
and the member matrices that prune together. Unit ``u`` owns the ``u``-th contiguous chunk of
every member's pruned axis (rows for q/k/v/gate/up, columns for o/down), which is how
Hugging Face lays out heads (and GQA groups: query head ``h`` reads KV head ``h // g``).

- attention, MHA or ``gqa_unit="kv_group"``: a unit is a KV group: k and v rows of one KV
  head, the rows of its ``g`` query heads and their o_proj columns. With MHA (g = 1), a head.
- attention, GQA with ``gqa_unit="q_head"``: a unit is a query head (q rows, o columns); the
  units form ``num_kv_heads`` blocks of ``g`` and every block loses the same number, so that
  the pruned model keeps ``g' = kept/num_kv_heads`` query heads per KV head.
- mlp: a unit is a channel: gate row, up row, down_proj column.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from loraprune.config import LoraPruneConfig
from loraprune.families import Family, family


@dataclass(frozen=True)
class Member:
    """A matrix of a group and the axis its units live on (``out``: rows, ``in``: columns)."""

    path: str
    axis: str


@dataclass(frozen=True)
class StructureGroup:
    """One layer's attention units or MLP channels, and the matrices that prune together."""

    layer: int
    kind: str  # "attention" or "mlp"
    num_units: int
    members: tuple[Member, ...]
    blocks: int = 1  # units split into this many equal blocks, each pruned by the same count
    round_to: int = 1  # kept unit counts are multiples of this (when the layer allows)

    @property
    def name(self) -> str:
        return f"layers.{self.layer}.{self.kind}"


@dataclass(frozen=True)
class LayerShape:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int


def unwrap_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a PEFT wrapper (or ``model`` itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def model_family(model: nn.Module) -> Family:
    """The :class:`Family` of ``model`` (LLaMA's for a pruned ``loraprune_llama``); raises if unsupported."""
    config = getattr(unwrap_model(model), "config", None)
    name = getattr(config, "model_type", None)
    if name is None:
        raise TypeError(
            f"model: expected a Hugging Face causal LM, got {type(model).__name__} without a config"
        )
    return family(name)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    path = model_family(model).layers
    model = unwrap_model(model)
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise TypeError(f"model: {type(model).__name__} has no {path}; pass the *ForCausalLM model") from None


def projection_paths(model: nn.Module, layer: int) -> dict[str, str]:
    """Module paths of the seven projections of decoder layer ``layer``, as its family lays them out."""
    spec = model_family(model)
    return {name: f"{spec.layers}.{layer}.{path}" for name, path in spec.projections}


def head_dim(model: nn.Module) -> int:
    """The attention modules' own head size (some families and versions ignore ``config.head_dim``)."""
    attention = decoder_layers(model)[0].self_attn
    if getattr(attention, "head_dim", None):
        return attention.head_dim
    config = unwrap_model(model).config
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layer_shape(model: nn.Module, layer: int) -> LayerShape:
    """Head and channel counts of one layer, read from its modules (pruned layers differ)."""
    model = unwrap_model(model)
    paths = projection_paths(model, layer)
    dim = head_dim(model)
    q_rows = model.get_submodule(paths["q_proj"]).out_features
    kv_rows = model.get_submodule(paths["k_proj"]).out_features
    channels = model.get_submodule(paths["gate_proj"]).out_features
    return LayerShape(q_rows // dim, kv_rows // dim, dim, channels)


def default_layers(num_layers: int) -> tuple[int, ...]:
    """LoRAPrune's choice: skip the first ``int(0.1·L)`` layers and the last one."""
    return tuple(range(int(0.1 * num_layers), num_layers - 1))


def pruned_layer_indices(model: nn.Module, config: LoraPruneConfig) -> tuple[int, ...]:
    num_layers = len(decoder_layers(model))
    layers = default_layers(num_layers) if config.layers is None else config.layers
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"layers: indices {bad} outside [0, {num_layers})")
    if not layers:
        raise ValueError(
            f"layers: no decoder layer to prune (the model has {num_layers}; pass layers explicitly)"
        )
    return tuple(sorted(set(layers)))


def build_groups(model: nn.Module, config: LoraPruneConfig) -> list[StructureGroup]:
    """The structure groups to prune, in layer order (attention before mlp within a layer)."""
    groups = []
    for layer in pruned_layer_indices(model, config):
        shape = layer_shape(model, layer)
        paths = projection_paths(model, layer)
        if config.prune_heads:
            groups.append(attention_group(layer, shape, paths, config.gqa_unit))
        if config.prune_channels:
            members = (
                Member(paths["gate_proj"], "out"),
                Member(paths["up_proj"], "out"),
                Member(paths["down_proj"], "in"),
            )
            groups.append(
                StructureGroup(layer, "mlp", shape.intermediate_size, members, round_to=config.round_to)
            )
    return groups


def attention_group(layer: int, shape: LayerShape, paths: dict[str, str], gqa_unit: str) -> StructureGroup:
    if shape.num_heads % shape.num_kv_heads:
        raise ValueError(
            f"layer {layer}: {shape.num_heads} query heads do not split into {shape.num_kv_heads} KV groups"
        )
    query = (Member(paths["q_proj"], "out"), Member(paths["o_proj"], "in"))
    if gqa_unit == "q_head" and shape.num_heads > shape.num_kv_heads:
        return StructureGroup(layer, "attention", shape.num_heads, query, blocks=shape.num_kv_heads)
    members = (*query, Member(paths["k_proj"], "out"), Member(paths["v_proj"], "out"))
    return StructureGroup(layer, "attention", shape.num_kv_heads, members)
