"""Exports of a checkpoint to serving engines' formats (optional dependencies, imported when called)."""

from loraprune.export.gguf import GGUFExport, export_gguf

__all__ = ["GGUFExport", "export_gguf"]
