"""vLLM model for pruned SmolLM3 checkpoints (imported by vLLM, which must be installed).

vLLM serves a dense SmolLM3 through its Transformers backend, which builds the model from
transformers' own classes; the pruned one is served by vLLM's own LLaMA model, each decoder layer
built from its own per-layer config view (as loraprune's LLaMA is), whose attention skips the
rotation on the layers where ``config.no_rope_layers`` is 0, as transformers' SmolLM3Attention does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.utils import extract_layer_index

from loraprune.integrations.vllm import check_tensor_parallel
from loraprune.integrations.vllm_models import PerLayerConfigMixin


class NoRotation(nn.Module):
    """RoPE's place in a NoPE layer: queries and keys pass unrotated."""

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return query, key


class SmolLM3Attention(LlamaAttention):
    def __init__(self, config: Any, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        if not config.no_rope_layers[extract_layer_index(kwargs["prefix"])]:
            self.rotary_emb = NoRotation()


class PrunedSmolLM3DecoderLayer(PerLayerConfigMixin, LlamaDecoderLayer):
    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config: Any = None, **kwargs: Any) -> None:
        super().__init__(
            vllm_config, prefix=prefix, config=config, attn_layer_type=SmolLM3Attention, **kwargs
        )


class PrunedSmolLM3ForCausalLM(LlamaForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        check_tensor_parallel(vllm_config.model_config.hf_config, get_tensor_model_parallel_world_size())
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=PrunedSmolLM3DecoderLayer)
