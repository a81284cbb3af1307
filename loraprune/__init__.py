"""loraprune: LoRA-guided structured pruning."""

__version__ = "0.1.0"
