"""vLLM plugin: serve loraprune's pruned checkpoints (per-layer head counts and MLP widths).

vLLM calls :func:`register` in each of its processes through the ``vllm.general_plugins`` entry
point (installed with ``pip install loraprune[vllm]``). It registers the ``Pruned*ForCausalLM``
architectures that loraprune writes into ``config.json``, each with the vLLM model its family
names (:mod:`loraprune.families`; the classes live in :mod:`loraprune.integrations.vllm_models`
or in the family's folder, modules vLLM imports only when it builds such a model).
This module itself does not import vLLM at import time.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

from loraprune.families import FAMILIES

# Pruned architecture (config.json ``architectures``) -> "module:Class" of the vLLM model serving it;
# vLLM imports the module only when it builds such a model.
VLLM_MODELS = {family.pruned_classes[1].__name__: family.vllm_model for family in FAMILIES.values()}
ARCHITECTURES = tuple(VLLM_MODELS)


def register() -> None:
    """Register the pruned architectures with vLLM's model registry (safe to call repeatedly)."""
    import loraprune  # noqa: F401  (registers the pruned config classes, so transformers reads config.json)

    try:
        from vllm import ModelRegistry
    except ImportError as error:
        raise ImportError("loraprune.integrations.vllm needs vLLM: pip install 'loraprune[vllm]'") from error
    supported = set(ModelRegistry.get_supported_archs())
    for name, model in VLLM_MODELS.items():
        if name not in supported:
            ModelRegistry.register_model(name, model)


def layer_shapes(config: Any) -> list[tuple[int, int, int]]:
    """(query heads, KV heads, MLP width) of each decoder layer: the pruned plan, or the dense config."""
    plan = getattr(config, "pruned_layers", None)
    if plan is None:
        dense = (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size)
        return [dense] * config.num_hidden_layers
    return [_shape(entry) for entry in plan]


def layer_config(config: Any, index: int, **overrides: Any) -> Any:
    """A shallow copy of ``config`` describing decoder layer ``index`` alone: its query heads, KV heads
    and MLP width, and ``head_dim`` pinned to the original (``hidden_size // heads`` would be wrong for
    a pruned layer). vLLM's own decoder layers, built from this view, get that layer's sizes."""
    heads, kv_heads, width = layer_shapes(config)[index]
    view = copy.copy(config)
    sizes = {
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": width,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
    }
    for name, value in {**sizes, **overrides}.items():
        setattr(view, name, value)
    return view


def _shape(entry: Mapping[str, Any]) -> tuple[int, int, int]:
    return entry["num_attention_heads"], entry["num_key_value_heads"], entry["intermediate_size"]


def _kv_splits(num_kv_heads: int, tp_size: int) -> bool:
    """vLLM splits KV heads over the ranks, or replicates them when there are fewer than ranks."""
    if num_kv_heads >= tp_size:
        return num_kv_heads % tp_size == 0
    return tp_size % num_kv_heads == 0


def check_tensor_parallel(config: Any, tp_size: int) -> None:
    """Raise ``ValueError`` naming each layer whose heads, KV heads or MLP width vLLM cannot split
    over ``tp_size`` ranks, with the pruning setting that avoids it.

    ``config`` is a (pruned or dense) Hugging Face config: ``num_attention_heads``,
    ``num_key_value_heads`` and ``intermediate_size`` are the original model's, and
    ``pruned_layers`` (when present) the per-layer plan.
    """
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise ValueError(f"tp_size must be a positive integer, got {tp_size!r}")
    if tp_size == 1:
        return
    problems = []
    for index, (heads, kv_heads, width) in enumerate(layer_shapes(config)):
        if heads % tp_size or not _kv_splits(kv_heads, tp_size):
            problems.append(
                f"layer {index}: {heads} query heads / {kv_heads} KV heads do not split over "
                f"{tp_size} ranks ({_attention_advice(config, heads, tp_size)})"
            )
        if width % tp_size:
            problems.append(
                f"layer {index}: MLP width {width} does not split over {tp_size} ranks "
                f"({_mlp_advice(config, tp_size)})"
            )
    if problems:
        raise ValueError(
            f"this pruned model cannot be served with tensor parallel size {tp_size}: " + "; ".join(problems)
        )


def _attention_advice(config: Any, kept_heads: int, tp_size: int) -> str:
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if heads % tp_size or not _kv_splits(kv_heads, tp_size):
        return f"the unpruned model's {heads} heads / {kv_heads} KV heads do not split either"
    # --round-to applies to MLP channels only; heads are kept in counts set by --ratio.
    if heads == kv_heads:
        return _ratio_advice(heads, kept_heads, tp_size, "heads per layer")
    q_head = f"prune with --gqa-unit q_head, which keeps all {kv_heads} KV heads in every layer"
    if kv_heads % tp_size == 0:
        return q_head
    # Fewer KV heads than ranks: vLLM replicates them, and each rank needs whole query heads.
    group = heads // kv_heads
    return (
        q_head
        + " and "
        + _ratio_advice(
            group, kept_heads // kv_heads, tp_size // kv_heads, "query heads per KV head"
        ).removeprefix("prune with ")
    )


def _ratio_advice(units: int, kept: int, multiple: int, what: str) -> str:
    most = units // multiple - (units > multiple)  # still pruning some, where a smaller multiple exists
    keep = min(most, max(1, round(kept / multiple))) * multiple
    return (
        f"prune with a --ratio that keeps a multiple of {multiple} of the {units} {what}, "
        f"e.g. --ratio {(units - keep) / units:.4g} keeps {keep}"
    )


def _mlp_advice(config: Any, tp_size: int) -> str:
    if config.intermediate_size % tp_size:
        return f"the unpruned model's width {config.intermediate_size} does not split either"
    example = math.lcm(tp_size, 128)
    return f"prune with --round-to {tp_size} or a multiple of it, e.g. --round-to {example}"
