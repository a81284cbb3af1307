"""Fused matrices split into their member projections while pruning, and fused again at compaction.

A family such as Phi-3 stores several projections in one matrix (:class:`~loraprune.families.base.FusedRows`:
``qkv_proj`` rows are [q | k | v], ``gate_up_proj`` rows [gate | up]), so a unit owns rows in
several segments of it. :func:`split_fused` gives each segment a module of its own, an ``nn.Linear``
beside the fused one at the path the family's projections name (``self_attn.q_proj``...), whose
weight is a view of the segment's rows, and puts a :class:`FusedRowsView` in the fused module's
place: it computes the concatenation of its members' outputs, so the family's own forward is
unchanged, and every member is then an ordinary projection for masks, LoRA, scores and compaction.
A PEFT LoRA adapter on the fused module splits exactly: each member keeps a copy of ``A`` and its own
rows of ``B`` (the fused delta's rows are ``s·B[rows]·A``). :func:`fuse_split` concatenates the
(compacted) members into one ``nn.Linear`` again, the layout the family's checkpoints have.
"""

from __future__ import annotations

import torch
from torch import nn

from loraprune.families.base import UNIT_COUNTS, FusedRows
from loraprune.structures import decoder_layers, head_dim, model_family, unwrap_model


class FusedRowsView(nn.Module):
    """A fused matrix computed from its split members, siblings of this module in ``parent``: the
    concatenation of their outputs, in row order. Holds no weights of its own."""

    def __init__(self, parent: nn.Module, names: tuple[str, ...], in_features: int) -> None:
        super().__init__()
        object.__setattr__(self, "parent", parent)  # a plain reference: the members are the parent's
        self.names = names
        self.in_features = in_features

    @property
    def members(self) -> list[nn.Module]:
        return [getattr(self.parent, name) for name in self.names]

    @property
    def out_features(self) -> int:
        return sum(member.out_features for member in self.members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([member(x) for member in self.members], dim=-1)

    def extra_repr(self) -> str:
        return f"rows of {' | '.join(self.names)}"


def layer_counts(config, layer: int) -> dict[str, int]:
    """Unit counts (``heads``, ``kv_heads``, ``channels``) of decoder layer ``layer``: the pruned
    plan's, or the config's for a dense model."""
    plan = getattr(config, "pruned_layers", None)
    entry = plan[layer] if plan else {key: getattr(config, key) for key in UNIT_COUNTS.values()}
    return {unit: int(entry[key]) for unit, key in UNIT_COUNTS.items()}


def _member_attribute(spec: FusedRows, projections: dict[str, str], name: str) -> str:
    parent, _, attribute = projections[name].rpartition(".")
    if parent != spec.path.rpartition(".")[0]:
        raise ValueError(f"family: projection {name} ({projections[name]}) is not beside {spec.path}")
    return attribute


def split_fused(model: nn.Module, peft_adapter: str | None = None) -> nn.Module:
    """Split every fused matrix of ``model`` into its members, in place (see the module docstring);
    a no-op for families without fused matrices and for matrices already split. ``peft_adapter``:
    the active adapter of a PEFT LoRA layer on a fused module, which becomes per-member
    :class:`~loraprune.nn.LoraPruneLinear` adapters. Returns the (unwrapped) model."""
    model = unwrap_model(model)
    family = model_family(model)
    if not family.fused:
        return model
    projections = dict(family.projections)
    dim = head_dim(model)
    for index, layer in enumerate(decoder_layers(model)):
        counts = layer_counts(model.config, index)
        for spec in family.fused:
            fused = layer.get_submodule(spec.path)
            if isinstance(fused, FusedRowsView):
                continue
            parent_path, _, fused_name = spec.path.rpartition(".")
            parent = layer.get_submodule(parent_path)
            widths = [counts[unit] * (1 if unit == "channels" else dim) for _, unit in spec.members]
            members = _split(fused, widths, peft_adapter, f"{family.layers}.{index}.{spec.path}")
            names = tuple(_member_attribute(spec, projections, name) for name, _ in spec.members)
            for name, member in zip(names, members, strict=True):
                setattr(parent, name, member)
            setattr(parent, fused_name, FusedRowsView(parent, names, members[0].in_features))
    return model


def _split(fused: nn.Module, widths: list[int], peft_adapter: str | None, path: str) -> list[nn.Module]:
    """The members of ``fused`` (rows in segments of ``widths``): ``nn.Linear`` views of its rows, or
    LoRA modules taking over a PEFT adapter."""
    from loraprune.nn import LoraPruneLinear, _is_peft_lora_layer

    peft = _is_peft_lora_layer(fused)
    base = fused.get_base_layer() if peft else fused
    if type(base) is not nn.Linear:
        raise TypeError(
            f"model: {path} is a {type(base).__name__}; splitting a fused matrix into its projections "
            "needs an nn.Linear (load the model unquantized; --quantize-base quantizes the split members)"
        )
    if peft and (peft_adapter is None or peft_adapter not in fused.lora_A):
        raise ValueError(
            f"model: {path} carries a PEFT LoRA layer without the active adapter {peft_adapter!r}"
        )
    if sum(widths) != base.out_features:
        raise ValueError(
            f"model: {path} has {base.out_features} rows, its segments {widths} need {sum(widths)} "
            "(the config's head or channel counts do not describe this layer)"
        )
    members, start = [], 0
    for width in widths:
        rows = slice(start, start + width)
        bias = None if base.bias is None else base.bias[rows]
        if peft:
            lora_a = fused.lora_A[peft_adapter].weight
            lora_b = fused.lora_B[peft_adapter].weight
            dropout = getattr(fused.lora_dropout[peft_adapter], "p", 0.0)
            member = LoraPruneLinear(base.weight[rows], bias, lora_a.shape[0], 1.0, dropout, lora_a.dtype)
            member.scaling = float(fused.scaling[peft_adapter])
            with torch.no_grad():
                member.lora_A.copy_(lora_a)  # every member reads the same input through the same A
                member.lora_B.copy_(lora_b[rows])
        else:
            member = nn.Linear(base.in_features, width, bias=bias is not None, device="meta")
            member.weight = nn.Parameter(base.weight[rows], requires_grad=base.weight.requires_grad)
            if bias is not None:
                member.bias = nn.Parameter(bias, requires_grad=base.bias.requires_grad)
        members.append(member)
        start += width
    return members


@torch.no_grad()
def fuse_split(model: nn.Module) -> nn.Module:
    """Concatenate the split members of every fused matrix into one ``nn.Linear`` again, in place
    (members must be plain ``nn.Linear``: compaction's output); a no-op where nothing is split."""
    model = unwrap_model(model)
    family = model_family(model)
    for layer in decoder_layers(model) if family.fused else ():
        for spec in family.fused:
            view = layer.get_submodule(spec.path)
            if not isinstance(view, FusedRowsView):
                continue
            members = view.members
            if any(type(m) is not nn.Linear for m in members):
                kinds = sorted({type(m).__name__ for m in members})
                raise TypeError(f"fuse_split: the members of {spec.path} must be nn.Linear, got {kinds}")
            fused = nn.Linear(
                view.in_features, view.out_features, bias=members[0].bias is not None, device="meta"
            )
            fused.weight = nn.Parameter(torch.cat([m.weight for m in members]))
            if fused.bias is not None:
                fused.bias = nn.Parameter(torch.cat([m.bias for m in members]))
            parent = view.parent
            for name in view.names:
                delattr(parent, name)
            setattr(parent, spec.path.rpartition(".")[2], fused)
    return model


__all__ = ["FusedRowsView", "fuse_split", "layer_counts", "split_fused"]
