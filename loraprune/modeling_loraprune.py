"""Pruned models: the family's ``*ForCausalLM`` with each layer resized to ``config.pruned_layers``.

The plan lists, per decoder layer, the head, KV-head and channel counts and the kept indices in
the original model's numbering. Self-contained (imports only torch, transformers and the
configuration file beside it): ``save_pretrained`` copies this file verbatim beside the weights,
with an ``auto_map`` in ``config.json``, so that
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works where loraprune is
not installed. loraprune itself uses these same classes.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
    SmolLM3ForCausalLM,
)
from transformers.models.olmo2 import Olmo2ForCausalLM
from transformers.models.olmo3 import Olmo3ForCausalLM
from transformers.models.phi3 import Phi3ForCausalLM
from transformers.models.phi3.modeling_phi3 import (
    ALL_ATTENTION_FUNCTIONS,
    Phi3Attention,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from .configuration_loraprune import (
    PrunedGemma2Config,
    PrunedGemma3TextConfig,
    PrunedLlamaConfig,
    PrunedMistralConfig,
    PrunedOlmo2Config,
    PrunedOlmo3Config,
    PrunedPhi3Config,
    PrunedQwen2Config,
    PrunedQwen3Config,
    PrunedSmolLM3Config,
)

PLAN_KEYS = (
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "kept_heads",
    "kept_kv_heads",
    "kept_channels",
)


class PrunedModelMixin:
    """Resizes each decoder layer to ``config.pruned_layers`` right after the family's constructor."""

    # (path in a decoder layer, plan count): modules whose 1-D weight is sliced with those units (head_dim each)
    passive_widths: tuple[tuple[str, str], ...] = ()
    # (path in a decoder layer, class): modules given a per-layer computation of the family's own
    pruned_module_classes: tuple[tuple[str, type], ...] = ()

    def __init__(self, config, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        plan = validate_plan(config.pruned_layers, config.num_hidden_layers)
        for index, entry in enumerate(plan):
            self.resize_pruned_layer(index, entry)
        self.swap_module_classes()

    def resize_pruned_layer(self, index: int, entry: dict) -> None:
        resize_layer(
            self,
            index,
            entry["num_attention_heads"],
            entry["num_key_value_heads"],
            entry["intermediate_size"],
        )
        layer, dim = self.model.layers[index], attention_head_dim(self)
        for path, count in self.passive_widths:
            module = layer.get_submodule(path)
            width = entry[count] * dim
            if module.weight.shape[0] != width:
                weight = module.weight
                module.weight = nn.Parameter(torch.empty(width, device=weight.device, dtype=weight.dtype))
        for path, eps in entry.get("norm_eps", {}).items():  # RMSNorms over a pruned width (OLMo 2)
            layer.get_submodule(path).variance_epsilon = eps

    def swap_module_classes(self) -> None:
        """Give modules the pruned classes' own computation (no state changes): called by the
        constructor, and by compaction after it swaps the model's class."""
        for layer in self.model.layers:
            for path, cls in self.pruned_module_classes:
                module = layer.get_submodule(path)
                if not isinstance(module, cls):
                    module.__class__ = cls


class PrunedLlamaForCausalLM(PrunedModelMixin, LlamaForCausalLM):
    config_class = PrunedLlamaConfig


class PrunedMistralForCausalLM(PrunedModelMixin, MistralForCausalLM):
    config_class = PrunedMistralConfig


class PrunedQwen2ForCausalLM(PrunedModelMixin, Qwen2ForCausalLM):
    config_class = PrunedQwen2Config


class PrunedQwen3ForCausalLM(PrunedModelMixin, Qwen3ForCausalLM):
    """Qwen3's q_norm/k_norm normalise each head over head_dim with weights all heads share: kept as they are."""

    config_class = PrunedQwen3Config


class PrunedPhi3Attention(Phi3Attention):
    """Phi-3's attention reading its own layer's widths: Phi3Attention splits the fused qkv at the
    config's global head count. The query width is o_proj's input, each of k and v the layer's KV
    heads times head_dim."""

    def forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        qkv = self.qkv_proj(hidden_states)
        query_pos = self.o_proj.in_features
        kv_width = self.num_key_value_heads * self.head_dim
        query_states = qkv[..., :query_pos].view(hidden_shape).transpose(1, 2)
        key_states = qkv[..., query_pos : query_pos + kv_width].view(hidden_shape).transpose(1, 2)
        value_states = qkv[..., query_pos + kv_width :].view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=getattr(self.config, "sliding_window", None),
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class PrunedPhi3ForCausalLM(PrunedModelMixin, Phi3ForCausalLM):
    """Phi-3 / Phi-4: the fused qkv_proj ([q | k | v] rows) and gate_up_proj ([gate | up]) of each
    layer's own counts, read by :class:`PrunedPhi3Attention`."""

    config_class = PrunedPhi3Config
    pruned_module_classes = (("self_attn", PrunedPhi3Attention),)

    def resize_pruned_layer(self, index: int, entry: dict) -> None:
        heads, kv_heads = entry["num_attention_heads"], entry["num_key_value_heads"]
        width, dim = entry["intermediate_size"], attention_head_dim(self)
        layer = self.model.layers[index]
        attention, mlp = layer.self_attn, layer.mlp
        resize_linears(
            (
                (attention, "qkv_proj", "out", (heads + 2 * kv_heads) * dim),
                (attention, "o_proj", "in", heads * dim),
                (mlp, "gate_up_proj", "out", 2 * width),
                (mlp, "down_proj", "in", width),
            )
        )
        set_attention_heads(attention, heads, kv_heads)


class PrunedOlmo2ForCausalLM(PrunedModelMixin, Olmo2ForCausalLM):
    """OLMo 2's q_norm/k_norm are RMSNorms over the whole q/k width (not per head): their weights are
    sliced with the heads, and compaction keeps the computation exact by scaling each weight by
    √(N/K) and its eps by N/K (the plan's per-layer ``norm_eps``)."""

    config_class = PrunedOlmo2Config
    passive_widths = (
        ("self_attn.q_norm", "num_attention_heads"),
        ("self_attn.k_norm", "num_key_value_heads"),
    )


class PrunedOlmo3ForCausalLM(PrunedModelMixin, Olmo3ForCausalLM):
    """OLMo 3: OLMo 2's attention (q/k norms over the whole width) with per-layer sliding windows."""

    config_class = PrunedOlmo3Config
    passive_widths = PrunedOlmo2ForCausalLM.passive_widths


class PrunedGemma2ForCausalLM(PrunedModelMixin, Gemma2ForCausalLM):
    """Gemma 2's four norms per layer, embedding scale, soft-caps and query_pre_attn_scalar act on the
    hidden size or per score, never on a head or channel: kept as they are.

    SDPA has no soft-cap: transformers 5.19 (vLLM 0.32's) chooses it by default for Gemma 2 and drops
    ``attn_logit_softcapping`` without a word; declared unsupported here, as transformers 5.23 does, so
    that the default is eager attention wherever the checkpoint is loaded."""

    config_class = PrunedGemma2Config
    _supports_sdpa = False


class PrunedGemma3ForCausalLM(PrunedModelMixin, Gemma3ForCausalLM):
    """Gemma 3 (text): Gemma 2's layout plus q_norm/k_norm over head_dim shared by all heads (as Qwen3's)."""

    config_class = PrunedGemma3TextConfig


class PrunedSmolLM3ForCausalLM(PrunedModelMixin, SmolLM3ForCausalLM):
    """SmolLM3: LLaMA's layout; its no-RoPE layers (``config.no_rope_layers``) are per layer, not per head."""

    config_class = PrunedSmolLM3Config


def validate_plan(plan: object, num_layers: int) -> list[dict]:
    if not isinstance(plan, list) or len(plan) != num_layers:
        raise ValueError(
            f"config.pruned_layers must list {num_layers} layers, got {type(plan).__name__} "
            f"of length {len(plan) if isinstance(plan, list) else '-'}"
        )
    for index, entry in enumerate(plan):
        missing = [k for k in PLAN_KEYS if k not in entry]
        if missing:
            raise ValueError(f"config.pruned_layers[{index}] lacks {missing}")
        counts = {k: entry[k] for k in PLAN_KEYS[:3]}
        if any(not isinstance(v, int) or v < 1 for v in counts.values()):
            raise ValueError(f"config.pruned_layers[{index}]: counts must be positive integers, got {counts}")
        if entry["num_attention_heads"] % entry["num_key_value_heads"]:
            raise ValueError(
                f"config.pruned_layers[{index}]: {entry['num_attention_heads']} heads do not split "
                f"into {entry['num_key_value_heads']} KV groups"
            )
        for key, count in (
            ("kept_heads", "num_attention_heads"),
            ("kept_kv_heads", "num_key_value_heads"),
            ("kept_channels", "intermediate_size"),
        ):
            if len(entry[key]) != entry[count]:
                raise ValueError(
                    f"config.pruned_layers[{index}]: {key} has {len(entry[key])} entries, "
                    f"{count} is {entry[count]}"
                )
    return plan


def set_attention_heads(attention: nn.Module, num_heads: int, num_kv_heads: int) -> None:
    """Keep an attention module's head bookkeeping consistent with resized projections."""
    attention.num_key_value_groups = num_heads // num_kv_heads
    # transformers 4.x reads these in forward (Qwen2 reshapes its output to ``hidden_size``)
    legacy = {
        "num_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "hidden_size": num_heads * attention.head_dim,
    }
    for name, value in legacy.items():
        if hasattr(attention, name):
            setattr(attention, name, value)


def attention_head_dim(model: nn.Module) -> int:
    """The attention modules' own head size (some families and versions ignore ``config.head_dim``)."""
    attention = model.model.layers[0].self_attn
    if getattr(attention, "head_dim", None):
        return attention.head_dim
    config = model.config
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def resize_layer(
    model: nn.Module, layer: int, num_heads: int, num_kv_heads: int, intermediate_size: int
) -> None:
    """Replace a layer's projections by uninitialised ones of the pruned sizes (before loading weights)."""
    dim = attention_head_dim(model)
    decoder_layer = model.model.layers[layer]
    attention, mlp = decoder_layer.self_attn, decoder_layer.mlp
    resize_linears(
        (
            (attention, "q_proj", "out", num_heads * dim),
            (attention, "k_proj", "out", num_kv_heads * dim),
            (attention, "v_proj", "out", num_kv_heads * dim),
            (attention, "o_proj", "in", num_heads * dim),
            (mlp, "gate_proj", "out", intermediate_size),
            (mlp, "up_proj", "out", intermediate_size),
            (mlp, "down_proj", "in", intermediate_size),
        )
    )
    set_attention_heads(attention, num_heads, num_kv_heads)


def resize_linears(widths) -> None:
    """Replace each (parent, name, axis, width)'s linear by an uninitialised one of that width on
    ``axis`` (``out``: rows, ``in``: columns) where it differs."""
    for parent, name, axis, width in widths:
        old = getattr(parent, name)
        in_features = width if axis == "in" else old.in_features
        out_features = width if axis == "out" else old.out_features
        if (in_features, out_features) != (old.in_features, old.out_features):
            new = nn.Linear(
                in_features,
                out_features,
                bias=old.bias is not None,
                device=old.weight.device,
                dtype=old.weight.dtype,
            )
            setattr(parent, name, new)
