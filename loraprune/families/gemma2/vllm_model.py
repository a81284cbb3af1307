"""vLLM model for pruned Gemma 2 checkpoints (imported by vLLM, which must be installed).

vLLM's Gemma2Model builds every decoder layer as ``Gemma2DecoderLayer(config, ...)`` from the one
model config, with no layer type to pass in (LLaMA's takes one). The pruned model runs vLLM's own
constructor with its module's ``Gemma2DecoderLayer`` name bound, for that call only, to a subclass
that builds the layer from its own per-layer config view
(:func:`loraprune.integrations.vllm.layer_config`): every layer gets its own head, KV-head and MLP
counts, and everything else (norms, soft-caps, sliding window, embedding scale, weight loading) is
vLLM's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import torch
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models import gemma2
from vllm.model_executor.models.gemma2 import Gemma2DecoderLayer, Gemma2ForCausalLM
from vllm.model_executor.models.utils import extract_layer_index, maybe_prefix

from loraprune.integrations.vllm import check_tensor_parallel, layer_config


@contextmanager
def layers_built_as(module: ModuleType, name: str, layer_cls: type) -> Iterator[None]:
    """Within the block, ``module.<name>`` (the decoder layer class a vLLM model's constructor looks up
    by name) is ``layer_cls``; restored afterwards, also on error."""
    original = getattr(module, name)  # AttributeError: vLLM renamed it, nothing is patched
    if not issubclass(layer_cls, original):
        raise TypeError(f"{layer_cls.__name__} must subclass {module.__name__}.{name}")
    setattr(module, name, layer_cls)
    try:
        yield
    finally:
        setattr(module, name, original)


def check_config(vllm_config: VllmConfig) -> Any:
    """The model's config, once its per-layer counts are known to split over the tensor-parallel ranks."""
    config = vllm_config.model_config.hf_config
    check_tensor_parallel(config, get_tensor_model_parallel_world_size())
    return config


class PrunedGemma2DecoderLayer(Gemma2DecoderLayer):
    def __init__(
        self, config: Any, cache_config: Any = None, quant_config: Any = None, prefix: str = ""
    ) -> None:
        view = layer_config(config, extract_layer_index(prefix))
        super().__init__(view, cache_config, quant_config, prefix=prefix)


class PrunedGemma2ForCausalLM(Gemma2ForCausalLM):
    """vLLM's Gemma 2 with per-layer sizes. vLLM's own class always computes the logits with the token
    embedding (every released Gemma 2 ties them); an untied checkpoint gets its own ``lm_head``."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        config = check_config(vllm_config)
        with layers_built_as(gemma2, "Gemma2DecoderLayer", PrunedGemma2DecoderLayer):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.lm_head = None
        if not config.tie_word_embeddings:
            self.lm_head = ParallelLMHead(
                config.vocab_size,
                config.hidden_size,
                quant_config=vllm_config.quant_config,
                prefix=maybe_prefix(prefix, "lm_head"),
            )

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        head = self.model.embed_tokens if self.lm_head is None else self.lm_head
        return self.logits_processor(head, hidden_states)
