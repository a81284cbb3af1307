"""Compaction: physically remove masked heads and channels and merge LoRA.

Reads the keep-masks off the patched projections (so it also works on a model masked by hand),
checks that they describe valid structures, replaces every projection by a dense ``nn.Linear``
(``W' = (W + s·B·A)[rows][:, cols]``, fp32 merge) and turns the model, in place and without
copying weights, into the family's pruned class with the plan in its config. A family saved as
another family's class (Granite as LLaMA) has its ``fold`` rewrite the weights that differ, and the
model is rebuilt as that class around the same tensors. A family's passive tensors (OLMo 2's
q_norm/k_norm weights) are sliced with their units, and its fused matrices (Phi-3's qkv_proj),
split while pruning, are fused again (:mod:`loraprune.fused`).
"""

from __future__ import annotations

import torch
from torch import nn

from loraprune import ops
from loraprune.families import Family
from loraprune.families.base import Passive
from loraprune.fused import fuse_split, split_fused
from loraprune.models import set_attention_heads
from loraprune.nn import LoraPruneLinear
from loraprune.quantization import QuantizedLoraPruneLinear
from loraprune.structures import (
    decoder_layers,
    head_dim,
    layer_shape,
    model_family,
    projection_paths,
    unwrap_model,
)


def unit_keep(module: nn.Module, axis: str, width: int, path: str) -> torch.Tensor:
    """Per-unit keep flags from a projection's mask; units of ``width`` must be kept or masked whole."""
    if not isinstance(module, LoraPruneLinear):
        size = module.out_features if axis == "out" else module.in_features
        return torch.ones(size // width, dtype=torch.bool)
    mask = (module.out_mask if axis == "out" else module.in_mask).cpu().view(-1, width)
    keep = mask.all(dim=1)
    if not torch.equal(keep, mask.any(dim=1)):
        raise ValueError(
            f"{path}: its {axis} mask keeps part of a unit of {width}; mask whole heads/channels"
        )
    return keep


def _agreeing(name: str, *keeps: torch.Tensor) -> torch.Tensor:
    if any(not torch.equal(keeps[0], k) for k in keeps[1:]):
        raise ValueError(
            f"{name}: the masks of its projections disagree; mask every member of a structure "
            "together (LoraPruner.set_group_mask does)"
        )
    return keeps[0]


def layer_keeps(model: nn.Module, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kept query heads, KV heads and MLP channels of one layer, checked for consistency."""
    shape = layer_shape(model, layer)
    paths = projection_paths(model, layer)
    modules = {name: model.get_submodule(path) for name, path in paths.items()}

    def keep(name: str, axis: str, width: int) -> torch.Tensor:
        return unit_keep(modules[name], axis, width, paths[name])

    dim = shape.head_dim
    heads = _agreeing(f"layer {layer} attention", keep("q_proj", "out", dim), keep("o_proj", "in", dim))
    kv_heads = _agreeing(f"layer {layer} attention", keep("k_proj", "out", dim), keep("v_proj", "out", dim))
    channels = _agreeing(
        f"layer {layer} mlp",
        keep("gate_proj", "out", 1),
        keep("up_proj", "out", 1),
        keep("down_proj", "in", 1),
    )
    per_group = heads.view(shape.num_kv_heads, -1).sum(dim=1)
    if bool((per_group[~kv_heads] > 0).any()):
        raise ValueError(f"layer {layer}: a query head is kept whose KV head is masked")
    kept_groups = per_group[kv_heads]
    if kept_groups.numel() == 0 or bool((kept_groups != kept_groups[0]).any()) or int(kept_groups[0]) == 0:
        raise ValueError(
            f"layer {layer}: every kept KV head must keep the same, non-zero number of query "
            f"heads (got {per_group.tolist()})"
        )
    if not bool(channels.any()):
        raise ValueError(f"layer {layer}: every MLP channel is masked")
    return heads, kv_heads, channels


@torch.no_grad()
def compact(model: nn.Module) -> nn.Module:
    """Remove masked structures, merge LoRA, and return the model as its pruned class (in place,
    except for a folded family, returned as a new model of its saved class).

    The result holds plain ``nn.Linear`` projections of per-layer sizes; its config records the
    plan, so ``model.save_pretrained(dir)`` writes a checkpoint that
    ``AutoModelForCausalLM.from_pretrained(dir)`` loads (after ``import loraprune``).
    """
    model = unwrap_model(model)
    family = model_family(model)
    for path, module in model.named_modules():  # before anything is replaced
        if isinstance(module, LoraPruneLinear) and module.fading:
            raise ValueError(
                f"compact: {path} has units that are still fading out (fade_steps); run until the fade "
                "ends (the units are masked then) before compacting"
            )
    split_fused(model)  # a no-op unless the family has fused matrices not split yet (an unpatched model)
    old_plan = getattr(model.config, "pruned_layers", None)
    dim = head_dim(model)
    plan = []
    for layer in range(len(decoder_layers(model))):
        heads, kv_heads, channels = layer_keeps(model, layer)
        kept_units = {
            "heads": heads.nonzero().squeeze(1),
            "kv": kv_heads.nonzero().squeeze(1),
            "channels": channels.nonzero().squeeze(1),
        }
        rows = {
            "q_proj": ("heads", dim),
            "k_proj": ("kv", dim),
            "v_proj": ("kv", dim),
            "gate_proj": ("channels", 1),
            "up_proj": ("channels", 1),
        }
        cols = {"o_proj": ("heads", dim), "down_proj": ("channels", 1)}
        for name, path in projection_paths(model, layer).items():
            module = model.get_submodule(path)
            device = module.out_mask.device if isinstance(module, LoraPruneLinear) else module.weight.device
            row_index = _expand(kept_units, rows.get(name), module.out_features, device)
            col_index = _expand(kept_units, cols.get(name), module.in_features, device)
            lora_a = getattr(module, "lora_A", None)
            if isinstance(module, QuantizedLoraPruneLinear):  # dequantizes the kept rows only
                weight, bias = module.compact(row_index, col_index)
            else:
                weight, bias = ops.compact_linear(
                    module.weight,
                    module.bias,
                    lora_a,
                    getattr(module, "lora_B", None),
                    getattr(module, "scaling", 0.0),
                    row_index,
                    col_index,
                )
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
            linear.weight = nn.Parameter(weight)
            if bias is not None:
                linear.bias = nn.Parameter(bias)
            model.set_submodule(path, linear)
        set_attention_heads(
            decoder_layers(model)[layer].self_attn, len(kept_units["heads"]), len(kept_units["kv"])
        )
        entry = _plan_entry(kept_units, None if old_plan is None else old_plan[layer])
        norm_eps = {
            passive.path: _slice_passive(decoder_layers(model)[layer], passive, kept_units, dim)
            for passive in family.passive
        }
        norm_eps = {path: eps for path, eps in norm_eps.items() if eps is not None}
        if norm_eps:
            entry["norm_eps"] = norm_eps
        plan.append(entry)
    fuse_split(model)
    for param in model.parameters():
        param.requires_grad_(True)  # a plain Hugging Face model again
    return _convert(model, family, plan)


def _expand(
    kept_units: dict[str, torch.Tensor], spec: tuple[str, int] | None, size: int, device: torch.device
) -> torch.Tensor | None:
    """Row/column indices of the kept units, each unit ``width`` wide (``None``: keep all)."""
    if spec is None:
        return None
    units, width = kept_units[spec[0]], spec[1]
    index = (units[:, None] * width + torch.arange(width)).flatten()
    return None if index.numel() == size else index.to(device)


# a passive tensor's unit kind -> (kept_units key, whether a unit is head_dim entries wide, else one)
_PASSIVE_UNITS = {"heads": ("heads", True), "kv_heads": ("kv", True), "channels": ("channels", False)}


def _slice_passive(
    layer: nn.Module, passive: Passive, kept_units: dict[str, torch.Tensor], dim: int
) -> float | None:
    """Slice a passive module's weight to its kept units' entries, in place; an RMSNorm over the whole
    width (``rms_over_width``) gets weight·√(N/K) and eps·N/K, computing what it computed over N
    entries of which the removed ones were 0. Returns its (new) eps where it has one in the plan."""
    module = layer.get_submodule(passive.path)
    key, heads = _PASSIVE_UNITS[passive.unit]
    weight = module.weight
    index = _expand(kept_units, (key, dim if heads else 1), weight.shape[0], weight.device)
    if index is not None:
        full, kept = weight.shape[0], index.numel()
        sliced = weight.index_select(0, index)
        if passive.rms_over_width:
            sliced = (sliced.float() * (full / kept) ** 0.5).to(weight.dtype)
            module.variance_epsilon = float(module.variance_epsilon) * full / kept
        module.weight = nn.Parameter(sliced, requires_grad=weight.requires_grad)
    return float(module.variance_epsilon) if passive.rms_over_width else None


def _plan_entry(kept_units: dict[str, torch.Tensor], previous: dict | None) -> dict:
    def original(key: str, units: torch.Tensor) -> list[int]:
        return [previous[key][i] for i in units.tolist()] if previous else units.tolist()

    heads, kv, channels = (
        original("kept_heads", kept_units["heads"]),
        original("kept_kv_heads", kept_units["kv"]),
        original("kept_channels", kept_units["channels"]),
    )
    return {
        "num_attention_heads": len(heads),
        "num_key_value_heads": len(kv),
        "intermediate_size": len(channels),
        "kept_heads": heads,
        "kept_kv_heads": kv,
        "kept_channels": channels,
    }


def _convert(model: nn.Module, family: Family, plan: list[dict]) -> nn.Module:
    config_cls, model_cls = family.pruned_classes
    old_config = model.config
    data = old_config.to_dict()
    for key in (
        "model_type",
        "transformers_version",
        "pruned_layers",
        "architectures",
        "quantization_config",
    ):
        data.pop(key, None)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None  # loaded quantized, but the compacted projections are dense
    state = None if family.fold is None else family.fold(model, data)  # pops what it folds from data
    new_config = config_cls(
        **data,
        pruned_layers=plan,
        architectures=[model_cls.__name__],
        attn_implementation=old_config._attn_implementation,
    )
    if state is not None:
        return _rebuild(model, model_cls, new_config, state)
    for module in model.modules():
        if getattr(module, "config", None) is old_config:
            module.config = new_config
    model.__class__ = model_cls  # a subclass adding only the plan-driven constructor: no state to convert
    if hasattr(model, "swap_module_classes"):
        model.swap_module_classes()  # modules of the pruned class's own (Phi-3's per-layer attention)
    return model


def _rebuild(model: nn.Module, model_cls: type, config, state: dict[str, torch.Tensor]) -> nn.Module:
    """``model_cls`` holding ``state`` (a folded family: its modules compute differently, so the class
    cannot simply be swapped). Built on the meta device, then given the tensors themselves."""
    with torch.device("meta"):
        new = model_cls(config)
    new.load_state_dict(state, assign=True)
    new.tie_weights()
    # non-persistent buffers (RoPE frequencies) are not in a state dict: the old model's are the same
    for name, buffer in model.named_buffers():
        module_name, _, buffer_name = name.rpartition(".")
        target = new.get_submodule(module_name)
        if buffer_name in target._buffers and target._buffers[buffer_name].is_meta:
            target._buffers[buffer_name] = buffer
    left = [name for name, t in (*new.named_parameters(), *new.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"compaction of {type(model).__name__}: no values for {left}")
    new.generation_config = model.generation_config
    device_map = getattr(model, "hf_device_map", None)
    if device_map is not None:  # placed by accelerate over several devices: the new modules need its hooks
        from accelerate import dispatch_model

        new = dispatch_model(new, device_map=device_map)
    return new.train(model.training)
