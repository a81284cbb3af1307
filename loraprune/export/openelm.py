"""A pruned Qwen3 as llama.cpp's ``openelm`` architecture (tensors only; :mod:`loraprune.export.gguf` writes the file).

llama.cpp's openelm builds each layer from per-layer head, KV-head and MLP counts, with one fused
``attn_qkv`` matrix (q rows, then k, then v: split by that layer's counts), RMSNorms over head_dim
on q and k (``attn_q_norm``/``attn_k_norm``, shared by all heads, as Qwen3's), NEOX RoPE (rotate
half: Hugging Face's row order, so nothing is permuted) and the output tied to ``token_embd``.
That is Qwen3's computation for a checkpoint whose embeddings are tied and whose projections have
no bias (the Qwen3 family refuses the others before anything is loaded).
"""

from __future__ import annotations

import numpy as np
from torch import nn


def openelm_tensors(model: nn.Module, gguf, num_layers: int) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array: q/k/v fused per layer; every tensor of the checkpoint placed or refused."""
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, num_layers)  # Qwen3's names -> blk.N.*
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # openelm's output is token_embd
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None or not name.endswith(".weight"):  # openelm has no biases
            raise ValueError(f"model_dir: tensor {name} has no place in llama.cpp's openelm architecture")
        tensors[gguf_name] = tensor.detach().float().cpu().numpy()
    for layer in range(num_layers):
        parts = [tensors.pop(f"blk.{layer}.attn_{part}.weight") for part in "qkv"]
        tensors[f"blk.{layer}.attn_qkv.weight"] = np.concatenate(parts)
    return tensors
