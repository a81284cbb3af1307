"""vLLM model classes for loraprune's pruned checkpoints (imported by vLLM, which must be installed).

Each class is vLLM's own ``*ForCausalLM`` whose decoder layers are vLLM's own decoder layers, each
built from a per-layer view of the config (:func:`loraprune.integrations.vllm.layer_config`), so
every layer's fused qkv / gate_up projections, attention and paged KV cache have that layer's
sizes and vLLM's kernels, batching and weight loading (which fuses q/k/v and gate/up by name,
slicing by each layer's own counts) work unchanged.
"""

from __future__ import annotations

from typing import Any, ClassVar

from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
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
