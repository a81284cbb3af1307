"""Configurations of pruned models: the family's config with a ``pruned_layers`` plan.

Self-contained (imports only transformers): ``save_pretrained`` copies this file verbatim beside
the weights, with an ``auto_map`` in ``config.json``, so that
``AutoConfig.from_pretrained(dir, trust_remote_code=True)`` works where loraprune is not
installed. loraprune itself uses these same classes.
"""

from __future__ import annotations

from transformers import (
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
    SmolLM3Config,
)
from transformers.models.olmo2 import Olmo2Config
from transformers.models.olmo3 import Olmo3Config
from transformers.models.phi3 import Phi3Config


class PrunedLlamaConfig(LlamaConfig):
    model_type = "loraprune_llama"


class PrunedMistralConfig(MistralConfig):
    model_type = "loraprune_mistral"


class PrunedQwen2Config(Qwen2Config):
    model_type = "loraprune_qwen2"


class PrunedQwen3Config(Qwen3Config):
    model_type = "loraprune_qwen3"


class PrunedPhi3Config(Phi3Config):
    model_type = "loraprune_phi3"


class PrunedOlmo2Config(Olmo2Config):
    model_type = "loraprune_olmo2"


class PrunedOlmo3Config(Olmo3Config):
    model_type = "loraprune_olmo3"


class PrunedGemma2Config(Gemma2Config):
    model_type = "loraprune_gemma2"


class PrunedGemma3TextConfig(Gemma3TextConfig):
    model_type = "loraprune_gemma3_text"


class PrunedSmolLM3Config(SmolLM3Config):
    model_type = "loraprune_smollm3"
