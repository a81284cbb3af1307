"""LLaMA-7B-shaped models with random weights, pruned variants of them, real models named as the
CLI names them, and a tight decode loop.

No checkpoint is downloaded: the model is built on the meta device in its final dtype and
materialised directly on the target device, so a 7B model never needs twice its memory.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from loraprune import LoraPruneConfig, LoraPruner
from loraprune.structures import decoder_layers, default_layers, head_dim

LLAMA_7B = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}


def llama7b_config(num_layers: int = 32) -> LlamaConfig:
    """LLaMA-7B's shapes, optionally with fewer decoder layers (the quick studies)."""
    return LlamaConfig(**{**LLAMA_7B, "num_hidden_layers": num_layers}, use_cache=False)


@torch.no_grad()
def random_llama(
    config: LlamaConfig, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> LlamaForCausalLM:
    """A ``LlamaForCausalLM`` with N(0, 0.02) matrices and unit norms, allocated once on ``device``."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    model.to_empty(device=device)
    generator = torch.Generator(device).manual_seed(seed)
    for param in model.parameters():
        if param.ndim == 2:
            param.normal_(0.0, 0.02, generator=generator)
        else:
            param.fill_(1.0)  # RMSNorm weights
    # to_empty left the rotary frequencies uninitialised (and the cast made them low precision)
    model.model.rotary_emb = LlamaRotaryEmbedding(config).to(device)
    return model.eval()


def projection_parameters(model: nn.Module) -> int:
    """Parameters of the decoder layers' projections (the LM head apart: callers count its tokens)."""
    return sum(
        m.weight.numel()
        for layer in decoder_layers(model)
        for m in layer.modules()
        if isinstance(m, nn.Linear)
    )


def attention_widths(model: nn.Module) -> list[int]:
    """Query features (heads × head_dim) of every layer; pruned layers differ."""
    return [layer.self_attn.q_proj.out_features for layer in decoder_layers(model)]


def kv_widths(model: nn.Module) -> list[int]:
    """Key (and value) features of every layer: the width of its KV cache."""
    return [layer.self_attn.k_proj.out_features for layer in decoder_layers(model)]


def prune_without_training(
    model: nn.Module, ratio: float, *, uniform: bool, round_to: int = 1, seed: int = 0
) -> nn.Module:
    """A compacted model: masks chosen from weight magnitudes (no training), then ``compact()``.

    ``uniform``: every layer loses ``ratio`` of its heads and channels. Otherwise LoRAPrune's
    default layer choice (the first ⌊0.1·L⌋ layers and the last one stay dense), units ranked
    across layers (``ranking="global"``), and the ratio raised so that as many units go in total.
    """
    num_layers = len(decoder_layers(model))
    layers = tuple(range(num_layers)) if uniform else default_layers(num_layers)
    config = LoraPruneConfig(
        ratio=ratio if uniform else ratio * num_layers / len(layers),
        criterion="magnitude",
        lora_r=1,  # magnitude needs no adapters: the smallest that patching accepts
        layers=layers,
        ranking="local" if uniform else "global",
        round_to=round_to,
        seed=seed,
    )
    pruner = LoraPruner(model, config)
    pruner.update_scores()
    pruner.prune()
    return pruner.compact().eval()


def real_models(spec: str, stack: contextlib.ExitStack) -> dict[str, Path]:
    """``NAME=MODEL,...`` as folders (a GGUF file is dequantized to a temporary one); the first is ``dense``."""
    from loraprune.sources import model_folder, resolve_model

    folders = {}
    for index, item in enumerate(spec.split(",")):
        name, sep, model = item.partition("=")
        if not sep or not name or not model:
            raise SystemExit(f"--models: {item!r} is not NAME=MODEL")
        source = resolve_model(model, arg="--models")
        folders["dense" if index == 0 else name] = stack.enter_context(model_folder(source, "float32"))
    return folders


def parameter_bytes(folder: Path, dtype: str) -> int:
    """The weights' bytes at ``dtype`` (tied matrices once), from the checkpoint's tensor shapes."""
    from safetensors import safe_open

    elements = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as tensors:
            names = tensors.keys()
            elements += sum(math.prod(tensors.get_slice(name).get_shape()) for name in names)
    return elements * getattr(torch, dtype).itemsize


class StaticDecoder:
    """Greedy decoding with preallocated per-layer KV caches, replayed as one CUDA graph per token.

    Hugging Face's static cache is sized from the config, which no longer describes a pruned
    model whose layers keep different head counts; this loop reads every size off the layer's
    own projections. Attention covers the whole preallocated cache with a mask (static shapes,
    as graph replay needs). The model's own modules do the projections, norms, MLP and rotary
    embedding, so :meth:`forward` computes what the Hugging Face forward computes.
    """

    def __init__(self, model: nn.Module, batch: int, max_length: int) -> None:
        self.model = model
        self.layers = decoder_layers(model)
        self.head_dim = head_dim(model)
        self.max_length = max_length
        weight = model.lm_head.weight
        self.caches = []
        for layer in self.layers:
            kv_heads = layer.self_attn.k_proj.out_features // self.head_dim
            shape = (batch, kv_heads, max_length, self.head_dim)
            self.caches.append(
                tuple(torch.zeros(shape, device=weight.device, dtype=weight.dtype) for _ in "kv")
            )
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=weight.device)
        self.position = torch.zeros((), dtype=torch.long, device=weight.device)
        self.graph: torch.cuda.CUDAGraph | None = None

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Logits of the last position after feeding ``tokens`` (B×T) from cache slot ``position``."""
        batch, length = tokens.shape
        positions = position + torch.arange(length, device=tokens.device)
        hidden = self.model.model.embed_tokens(tokens)
        cos, sin = self.model.model.rotary_emb(hidden, positions.expand(batch, length))
        visible = torch.arange(self.max_length, device=tokens.device)[None, :] <= positions[:, None]
        for layer, (k_cache, v_cache) in zip(self.layers, self.caches, strict=True):
            attention = layer.self_attn
            x = layer.input_layernorm(hidden)
            q, k, v = (
                proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
                for proj in (attention.q_proj, attention.k_proj, attention.v_proj)
            )
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k_cache.index_copy_(2, positions, k)
            v_cache.index_copy_(2, positions, v)
            groups = q.shape[1] // k_cache.shape[1]
            keys, values = (
                c.repeat_interleave(groups, dim=1) if groups > 1 else c for c in (k_cache, v_cache)
            )
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible)
            hidden = hidden + attention.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.model.lm_head(self.model.model.norm(hidden[:, -1]))

    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """Fill the caches with ``prompt`` (eager) and set up the first decode step; returns its logits."""
        logits = self.forward(prompt, torch.zeros((), dtype=torch.long, device=prompt.device))
        self.tokens.copy_(logits.argmax(-1, keepdim=True))
        self.position.fill_(prompt.shape[1])
        return logits

    def _step(self) -> None:
        logits = self.forward(self.tokens, self.position)
        self.tokens.copy_(logits.argmax(-1, keepdim=True))
        self.position.add_(1)

    def capture(self) -> None:
        """Record one decode step as a CUDA graph (after a warm-up on a side stream, as capture needs)."""
        start = self.position.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()
        self.position.copy_(start)  # warm-up and capture advanced it; their cache writes get overwritten

    def step(self) -> None:
        """One decode step: the captured graph when there is one, else eager."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()


def decode_context(prompt_length: int, new_tokens: int) -> int:
    """Cache slots for a decode run: prompt, new tokens and the capture's warm-up steps, rounded up
    to a multiple of 64 (aligned rows for the attention mask and the attention kernels)."""
    return math.ceil((prompt_length + new_tokens + 3) / 64) * 64


def attention_flops(widths: Sequence[int], batch: int, query_length: int, context: float) -> float:
    """QKᵀ and PV products over ``context`` visible keys per query, summed over layers."""
    return sum(2 * 2 * batch * query_length * context * width for width in widths)


def causal_context(length: int) -> float:
    """Mean number of visible keys per query under a causal mask."""
    return (length + 1) / 2
