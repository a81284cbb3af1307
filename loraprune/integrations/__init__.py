"""Integrations with serving engines and training loops (``trainer``: a transformers ``Trainer``
callback). Nothing here is imported by this package (or ``loraprune``): each submodule imports its
engine or trainer when it is imported itself, so ``loraprune`` works without them installed."""
