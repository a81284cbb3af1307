"""The language model of a multimodal Gemma 3 (``gemma3``: 4B and larger) saved alone, as the text-only
Gemma 3 (``gemma3_text``) that loraprune prunes.

transformers' Gemma3ForConditionalGeneration keeps the language model under
``model.language_model`` (a Gemma3TextModel, the very class inside Gemma3ForCausalLM) and the
output matrix as ``lm_head``; for text it computes what Gemma3ForCausalLM computes with those
modules. The vision tower and the multimodal projector are left out: the saved model reads text
only. Its tokenizer files are copied beside it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

# tokenizer and chat files of a Hugging Face folder, copied as they are
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template*")


def save_language_model(model_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the language model of the multimodal Gemma 3 in ``model_dir`` to ``out`` as a ``gemma3_text``
    checkpoint (Gemma3ForCausalLM, in the checkpoint's own dtype); returns ``out``."""
    import json

    from transformers import Gemma3ForCausalLM, Gemma3ForConditionalGeneration

    source, out = Path(model_dir), Path(out)
    model_type = json.loads((source / "config.json").read_text()).get("model_type")
    if model_type != "gemma3":
        raise ValueError(
            f"model_dir: {source} holds a {model_type!r} checkpoint, not a multimodal Gemma 3 ('gemma3')"
        )
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"out: {out} exists and is not empty")
    multimodal = Gemma3ForConditionalGeneration.from_pretrained(source, dtype="auto")
    text_config = multimodal.config.text_config
    # tied as the modules are (the composite config and its text config each have the flag)
    text_config.tie_word_embeddings = multimodal.lm_head.weight is multimodal.get_input_embeddings().weight
    with torch.device("meta"):
        model = Gemma3ForCausalLM(text_config)
    model.model = multimodal.model.language_model  # the modules themselves: no copy
    model.lm_head = multimodal.lm_head
    model.generation_config = multimodal.generation_config
    model.save_pretrained(out)
    for pattern in TOKENIZER_FILES:
        for file in source.glob(pattern):
            shutil.copy(file, out / file.name)
    return out
