"""The ops loraprune is built on, one module each, the PyTorch reference being the specification.

Every op dispatches per call to the fastest backend that can run it (``cuda`` extension >
``triton`` > ``torch``); see :mod:`loraprune.ops._dispatch` for the rules and
``LORAPRUNE_BACKEND``.
"""

from loraprune.ops._dispatch import BACKENDS, BackendUnavailableError, backend_unavailable_reason
from loraprune.ops.compact_linear import compact_linear
from loraprune.ops.lora_importance import lora_importance
from loraprune.ops.masked_lora_linear import masked_lora_linear
from loraprune.ops.quantized_weight import QuantizedWeight
from loraprune.ops.score_update import score_update
from loraprune.ops.taylor_importance import taylor_importance

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "QuantizedWeight",
    "backend_unavailable_reason",
    "compact_linear",
    "lora_importance",
    "masked_lora_linear",
    "score_update",
    "taylor_importance",
]
