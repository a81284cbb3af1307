"""vLLM model for pruned Gemma 3 (text) checkpoints (imported by vLLM, which must be installed).

As for Gemma 2 (:mod:`loraprune.families.gemma2.vllm_model`): vLLM's Gemma3Model builds every
decoder layer as ``Gemma3DecoderLayer(config, ...)``; the pruned model runs vLLM's constructor with
that name bound, for the call only, to a subclass built from the layer's own config view. vLLM's
q/k norms are over head_dim, shared by the heads, as in transformers; its Gemma3ForCausalLM already
has an untied ``lm_head`` where the config says so.
"""

from __future__ import annotations

from typing import Any

from vllm.config import VllmConfig
from vllm.model_executor.models import gemma3
from vllm.model_executor.models.gemma3 import Gemma3DecoderLayer, Gemma3ForCausalLM
from vllm.model_executor.models.utils import extract_layer_index

from loraprune.families.gemma2.vllm_model import check_config, layers_built_as
from loraprune.integrations.vllm import layer_config


class PrunedGemma3DecoderLayer(Gemma3DecoderLayer):
    def __init__(
        self, config: Any, cache_config: Any = None, quant_config: Any = None, prefix: str = ""
    ) -> None:
        view = layer_config(config, extract_layer_index(prefix))
        super().__init__(view, cache_config, quant_config, prefix=prefix)


class PrunedGemma3ForCausalLM(Gemma3ForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        check_config(vllm_config)
        with layers_built_as(gemma3, "Gemma3DecoderLayer", PrunedGemma3DecoderLayer):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
