"""vLLM model classes for loraprune's pruned checkpoints (imported by vLLM, which must be installed).

Each class is vLLM's own ``*ForCausalLM`` whose decoder layers are vLLM's own decoder layers, each
built from a per-layer view of the config (:func:`loraprune.integrations.vllm.layer_config`), so
every layer's fused qkv / gate_up projections, attention and paged KV cache have that layer's
sizes and vLLM's kernels, batching and weight loading (which fuses q/k/v and gate/up by name,
slicing by each layer's own counts) work unchanged. OLMo 2 and 3, which vLLM 0.32 serves only through
its transformers backend (one head count for every layer), get a model built here from vLLM's LLaMA
layers (:class:`PrunedOlmo2DecoderLayer`).
"""

from __future__ import annotations

from typing import Any, ClassVar

from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralDecoderLayer, MistralForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3DecoderLayer
from vllm.model_executor.models.utils import extract_layer_index

from loraprune.integrations.vllm import check_tensor_parallel, layer_config


class PerLayerConfigMixin:
    """Builds the decoder layer from the config view of its own index (read from its prefix)."""

    config_overrides: ClassVar[dict[str, Any]] = {}

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config: Any = None, **kwargs: Any) -> None:
        config = config or vllm_config.model_config.hf_config
        view = layer_config(config, extract_layer_index(prefix), **self.config_overrides)
        super().__init__(vllm_config=vllm_config, prefix=prefix, config=view, **kwargs)


class PrunedLlamaDecoderLayer(PerLayerConfigMixin, LlamaDecoderLayer):
    pass


class PrunedMistralDecoderLayer(PerLayerConfigMixin, MistralDecoderLayer):
    pass


class PrunedQwen2DecoderLayer(PerLayerConfigMixin, LlamaDecoderLayer):
    """Qwen2's layer is LLaMA's with biased q/k/v; vLLM's Qwen2 attention derives the head size
    from ``hidden_size // heads``, wrong for a pruned layer, while LLaMA's reads ``head_dim``."""

    config_overrides: ClassVar[dict[str, Any]] = {"qkv_bias": True, "attention_bias": False}


class PrunedQwen3DecoderLayer(Qwen3DecoderLayer):
    """vLLM's Qwen3 layer (q/k norms over head_dim) built from its layer's config view, with LLaMA's
    layer signature: vLLM's LlamaModel takes a layer type, while its Qwen3 model hard-codes its own."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config: Any = None) -> None:
        config = config or vllm_config.model_config.hf_config
        super().__init__(
            config=layer_config(config, extract_layer_index(prefix)),
            cache_config=vllm_config.cache_config,
            quant_config=vllm_config.quant_config,
            prefix=prefix,
        )


def _check(vllm_config: VllmConfig) -> None:
    check_tensor_parallel(vllm_config.model_config.hf_config, get_tensor_model_parallel_world_size())


class PrunedLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        _check(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=PrunedLlamaDecoderLayer)


class PrunedMistralForCausalLM(MistralForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        _check(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=PrunedMistralDecoderLayer)


class PrunedQwen2ForCausalLM(LlamaForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        _check(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=PrunedQwen2DecoderLayer)


class PrunedQwen3ForCausalLM(LlamaForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        _check(vllm_config)
        if getattr(vllm_config.model_config.hf_config, "attention_bias", False):
            raise ValueError(
                "attention_bias: vLLM's Qwen3 attention has no o_proj bias (its loader would drop it); "
                "serve this checkpoint with transformers"
            )
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=PrunedQwen3DecoderLayer)


class PrunedPhi3ForCausalLM(PrunedLlamaForCausalLM):
    """Phi-3 / Phi-4: LLaMA's model reading the fused qkv_proj and gate_up_proj as they are saved (vLLM's
    loader splits each into q/k/v and gate/up by the layer's own counts), vLLM's Phi-3 mapping."""

    packed_modules_mapping: ClassVar[dict[str, list[str]]] = {
        "qkv_proj": ["qkv_proj"],
        "gate_up_proj": ["gate_up_proj"],
    }


def olmo2_layer_config(config: Any, index: int) -> Any:
    """The layer view of an OLMo 2 / 3 config: its widths, the eps of its q/k norms (the plan's, rewritten
    at compaction, else the config's) and, for OLMo 3, the RoPE settings of its layer type."""
    plan = getattr(config, "pruned_layers", None)
    norm_eps = (plan[index].get("norm_eps") if plan else None) or {}
    overrides = {
        "q_norm_eps": norm_eps.get("self_attn.q_norm", config.rms_norm_eps),
        "k_norm_eps": norm_eps.get("self_attn.k_norm", config.rms_norm_eps),
    }
    rope, layer_types = getattr(config, "rope_parameters", None), getattr(config, "layer_types", None)
    if layer_types and isinstance(rope, dict) and layer_types[index] in rope:
        overrides["rope_parameters"] = rope[layer_types[index]]
    return layer_config(config, index, **overrides)


class PrunedOlmo2Attention(LlamaAttention):
    """LLaMA's attention with OLMo 2's q_norm/k_norm: RMSNorms over the layer's whole q and k width, before
    RoPE (vLLM 0.32 has no OLMo 2 model of its own: it serves OLMo 2 through its transformers backend)."""

    def __init__(self, config: Any, **kwargs: Any) -> None:
        super().__init__(config=config, **kwargs)
        self.q_norm = RMSNorm(self.q_size, eps=config.q_norm_eps)
        self.k_norm = RMSNorm(self.kv_size, eps=config.k_norm_eps)

    def forward(self, positions, hidden_states):
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.q_norm(q.contiguous()), self.k_norm(k.contiguous())
        q, k = self.rotary_emb(positions, q, k)
        output, _ = self.o_proj(self.attn(q, k, v))
        return output


class PrunedOlmo2DecoderLayer(LlamaDecoderLayer):
    """OLMo 2's layer: no pre-norms, RMSNorms on the attention and MLP outputs before each residual sum
    (``h + norm(attn(h))``, ``h + norm(mlp(h))``). OLMo 3's per-layer sliding windows come from LLaMA's
    attention, which reads ``layer_types``."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config: Any = None) -> None:
        config = config or vllm_config.model_config.hf_config
        view = olmo2_layer_config(config, extract_layer_index(prefix))
        super().__init__(
            vllm_config=vllm_config, prefix=prefix, config=view, attn_layer_type=PrunedOlmo2Attention
        )
        del self.input_layernorm
        self.post_feedforward_layernorm = RMSNorm(view.hidden_size, eps=view.rms_norm_eps)

    def forward(self, positions, hidden_states, residual):
        """LlamaModel's convention: the layer's stream is ``hidden_states + residual`` (summed by the next
        layer, or by the final norm's fused add)."""
        if residual is not None:
            hidden_states = hidden_states + residual
        attention = self.self_attn(positions=positions, hidden_states=hidden_states)
        residual = hidden_states + self.post_attention_layernorm(attention)
        return self.post_feedforward_layernorm(self.mlp(residual)), residual


class PrunedOlmo2ForCausalLM(LlamaForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        _check(vllm_config)
        if get_tensor_model_parallel_world_size() > 1:
            raise ValueError(
                "tensor parallel: OLMo 2's q/k norms normalise over every head of a layer, which would be "
                "split over the ranks; serve this checkpoint with tensor parallel size 1"
            )
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=PrunedOlmo2DecoderLayer)


class PrunedOlmo3ForCausalLM(PrunedOlmo2ForCausalLM):
    """OLMo 3: OLMo 2's layers with the sliding windows and RoPE of each layer's type."""
