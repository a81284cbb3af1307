"""loraprune: structured pruning of LLaMA-family models while LoRA fine-tunes them (LoRAPrune).

``import loraprune`` registers the pruned model classes with transformers' Auto classes, so a
pruned checkpoint loads with ``AutoModelForCausalLM.from_pretrained``.
"""

from loraprune.compaction import compact
from loraprune.config import LoraPruneConfig
from loraprune.io import load_model
from loraprune.models import register_auto_classes
from loraprune.nn import LoraPruneLinear, patch_model, unpatch_model
from loraprune.pruner import LoraPruner, count_parameters

__version__ = "0.1.0"

register_auto_classes()

__all__ = [
    "LoraPruneConfig",
    "LoraPruneLinear",
    "LoraPruner",
    "compact",
    "count_parameters",
    "load_model",
    "patch_model",
    "unpatch_model",
]
