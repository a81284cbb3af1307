"""Export a (pruned or dense) checkpoint to GGUF for llama.cpp.

llama.cpp's ``deci`` architecture builds every layer from per-layer arrays
(``attention.head_count``, ``attention.head_count_kv``, ``feed_forward_length``), so layers of
different widths, any per-layer GQA ratio and unpruned layers all load in stock llama.cpp;
otherwise it computes what the ``llama`` architecture computes (RMSNorm, SwiGLU, RoPE on
adjacent pairs, optional projection biases). llama.cpp's own converter writes one global head
count, so the file is written here with gguf-py.

Conventions, as llama.cpp's converter follows them for Llama: q/k rows (and biases) are permuted
from Hugging Face's rotate-half layout to adjacent pairs, with each layer's own head counts;
``key_length`` = ``value_length`` = ``rope.dimension_count`` = head_dim; scaled RoPE
(``linear``, ``llama3``) becomes the per-frequency ``rope_freqs`` tensor; a tied output reuses
``token_embd``. What llama.cpp cannot compute the same way is refused before anything is written.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
ARCH = "deci"
Q8_0_BLOCK = 32
# Rope types whose frequencies are fixed per dimension (no attention factor, no dependence on length).
STATIC_ROPE_TYPES = ("default", "linear", "llama3")
# Byte-level BPE pre-tokenizers llama.cpp knows: the Split regex of tokenizer.json -> tokenizer.ggml.pre.
# (A lone ByteLevel pre-tokenizer with use_regex is GPT-2's split: "gpt-2".)
PRE_TOKENIZER_REGEXES = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}


@dataclass(frozen=True)
class GGUFExport:
    """What :func:`export_gguf` wrote."""

    path: Path
    outtype: str
    tensors: int
    f16_fallback: tuple[str, ...]  # q8_0 only: tensors whose rows are not a multiple of 32, written f16


@dataclass(frozen=True)
class Vocabulary:
    tokens: list[str]
    token_types: list[int]
    pre: str


def export_gguf(
    model_dir: str | os.PathLike, out: str | os.PathLike, *, outtype: str = "f16", overwrite: bool = False
) -> GGUFExport:
    """Write ``model_dir`` (a Hugging Face folder, pruned or dense) as a GGUF file that llama.cpp runs.

    ``outtype``: ``f32``, ``f16``, ``bf16`` or ``q8_0`` for the matrices (norms and ``rope_freqs``
    stay f32). ``q8_0`` needs rows that are multiples of 32; a matrix whose rows are not (a pruned
    ``down_proj``: prune with ``--round-to 32``) is written f16 and listed in ``f16_fallback``.
    Bad input raises before anything is written; the file appears complete or not at all.
    """
    gguf = _import_gguf()
    from loraprune.io import check_model_dir, load_model
    from loraprune.structures import decoder_layers, head_dim, layer_shape

    if outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    out = _check_out(out, overwrite)
    path = check_model_dir(model_dir)
    config = json.loads((path / "config.json").read_text())
    _check_config(config)
    vocab = read_vocabulary(path, config["vocab_size"])

    model = load_model(path, dtype=_saved_dtype(config)).eval()
    layers = range(len(decoder_layers(model)))
    shapes = [layer_shape(model, i) for i in layers]
    dim = head_dim(model)
    rope_freqs = _rope_freq_factors(model, config, dim)
    hf_config = model.config
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    tensors = _gguf_tensors(model, gguf, len(shapes), shapes, tied)
    if rope_freqs is not None:
        tensors["rope_freqs.weight"] = rope_freqs

    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, ARCH)
        writer.add_name(path.resolve().name)
        writer.add_file_type(_FILE_TYPES[outtype](gguf))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_context_length(_context_length(hf_config))
        writer.add_embedding_length(hf_config.hidden_size)
        writer.add_block_count(len(shapes))
        writer.add_feed_forward_length([s.intermediate_size for s in shapes])
        writer.add_head_count([s.num_heads for s in shapes])
        writer.add_head_count_kv([s.num_kv_heads for s in shapes])
        writer.add_key_length(dim)
        writer.add_value_length(dim)
        writer.add_rope_dimension_count(dim)
        writer.add_rope_freq_base(float(_rope_parameters(config)["rope_theta"]))
        writer.add_layer_norm_rms_eps(float(hf_config.rms_norm_eps))
        writer.add_vocab_size(config["vocab_size"])
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(vocab.pre)
        writer.add_token_list(vocab.tokens)
        writer.add_token_types(vocab.token_types)
        gguf.SpecialVocab(path, load_merges=True, n_vocab=config["vocab_size"]).add_to_gguf(writer)
        fallback = []
        for name, array in tensors.items():
            data, raw_dtype = _encode(gguf, array, outtype)
            if outtype == "q8_0" and array.ndim == 2 and raw_dtype != gguf.GGMLQuantizationType.Q8_0:
                fallback.append(name)
            writer.add_tensor(name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 -> an ordinary file's mode
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return GGUFExport(out, outtype, len(tensors), tuple(fallback))


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError(
            "the GGUF export needs the gguf package (gguf-py): pip install 'loraprune[gguf]'"
        ) from None
    return gguf


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_out(out: str | os.PathLike, overwrite: bool) -> Path:
    out = Path(out)
    if out.is_dir():
        raise IsADirectoryError(f"out: {out} is a directory; give the .gguf file to write")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"out: the folder {out.parent} does not exist")
    if out.exists() and not overwrite:
        raise FileExistsError(f"out: {out} exists (overwrite=True, --overwrite, replaces it)")
    return out


def _saved_dtype(config: dict) -> str:
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return dtype if dtype in ("float32", "bfloat16", "float16") else "float32"


def _rope_parameters(config: dict) -> dict:
    """RoPE settings from transformers 5's ``rope_parameters`` or 4.x's ``rope_theta``/``rope_scaling``."""
    params = config.get("rope_parameters")
    if params is None:
        params = {**(config.get("rope_scaling") or {}), "rope_theta": config.get("rope_theta", 10000.0)}
    return params


def _check_config(config: dict) -> None:
    """Refuse what llama.cpp's deci architecture does not compute the same way."""
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(
            f"model_dir: hidden_act {config['hidden_act']!r} is not supported; llama.cpp's deci MLP is SwiGLU (silu)"
        )
    params = _rope_parameters(config)
    if "rope_theta" not in params:
        raise ValueError(
            "model_dir: per-layer-type rope_parameters are not supported (llama.cpp's deci has one RoPE)"
        )
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in STATIC_ROPE_TYPES:
        raise ValueError(
            f"model_dir: rope scaling {rope_type!r} is not supported in GGUF export "
            f"(supported: {', '.join(STATIC_ROPE_TYPES)}); llama.cpp's deci would compute a different RoPE"
        )
    if float(config.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("model_dir: partial_rotary_factor != 1 is not supported (deci rotates whole heads)")
    if config.get("use_sliding_window"):
        raise ValueError("model_dir: use_sliding_window is not supported (deci attends to the whole context)")


def _context_length(config) -> int:
    """The training context; a sliding window (Mistral) caps it, since deci attends to everything."""
    window = getattr(config, "sliding_window", None)
    length = config.max_position_embeddings
    return min(length, window) if window else length


def _rope_freq_factors(model: nn.Module, config: dict, dim: int) -> np.ndarray | None:
    """``rope_freqs`` (llama.cpp divides each frequency by it), from the model's own inverse frequencies."""
    rotary = model.model.rotary_emb
    if float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
        raise ValueError(
            f"model_dir: RoPE with an attention factor of {rotary.attention_scaling} is not supported"
        )
    theta = float(_rope_parameters(config)["rope_theta"])
    default = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    inv_freq = rotary.inv_freq.detach().float().cpu()
    if inv_freq.shape != default.shape:
        raise ValueError(
            f"model_dir: RoPE has {inv_freq.numel()} frequencies, head_dim {dim} needs {dim // 2}"
        )
    factors = default / inv_freq
    if torch.allclose(factors, torch.ones_like(factors), rtol=1e-6, atol=0):
        return None
    return factors.numpy().astype(np.float32)


def _permute_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Hugging Face's rotate-half row order per head -> llama.cpp's adjacent pairs (rows or a bias)."""
    return (
        weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def unpermute_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The inverse of the q/k permutation: llama.cpp's adjacent pairs -> Hugging Face's halves."""
    return (
        weight.reshape(num_heads, weight.shape[0] // num_heads // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _gguf_tensors(model: nn.Module, gguf, num_layers: int, shapes: list, tied: bool) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array, q/k permuted; every tensor of the checkpoint is placed or refused."""
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DECI, num_layers)
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd when there is no output tensor
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"model_dir: tensor {name} has no place in llama.cpp's deci architecture")
        tensor = tensor.detach().float().cpu()
        if ".self_attn.q_proj." in name or ".self_attn.k_proj." in name:
            layer = int(name.split(".")[2])
            shape = shapes[layer]
            heads = shape.num_heads if ".q_proj." in name else shape.num_kv_heads
            if shape.head_dim % 2:
                raise ValueError(
                    f"model_dir: layer {layer}: RoPE needs an even head_dim, got {shape.head_dim}"
                )
            tensor = _permute_rows(tensor, heads)
        tensors[gguf_name] = tensor.numpy()
    return tensors


def _encode(gguf, array: np.ndarray, outtype: str):
    """The bytes/array to write and its GGML type: norms and 1-D tensors stay f32."""
    types = gguf.GGMLQuantizationType
    if array.ndim < 2 or outtype == "f32":
        return array.astype(np.float32), types.F32
    if outtype == "q8_0" and array.shape[-1] % Q8_0_BLOCK == 0:
        return gguf.quants.quantize(array, types.Q8_0), types.Q8_0
    if outtype == "bf16":
        return gguf.quants.quantize(array, types.BF16), types.BF16
    return array.astype(np.float16), types.F16


_FILE_TYPES = {
    "f32": lambda gguf: gguf.LlamaFileType.ALL_F32,
    "f16": lambda gguf: gguf.LlamaFileType.MOSTLY_F16,
    "bf16": lambda gguf: gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": lambda gguf: gguf.LlamaFileType.MOSTLY_Q8_0,
}


def read_vocabulary(model_dir: Path, vocab_size: int) -> Vocabulary:
    """Tokens and types, by id, of a byte-level BPE ``tokenizer.json`` (GPT-2, Llama 3, Qwen2 style)."""
    from gguf import TokenType

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"model_dir: {model_dir} has no tokenizer.json (save the tokenizer with the model)"
        )
    tokenizer = json.loads(path.read_text())
    model = tokenizer.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ValueError(
            f"model_dir: {path}: only byte-level BPE tokenizers are supported (GPT-2, Llama 3, Qwen2 style); "
            f"got a {model.get('type')} model{' with byte fallback (SentencePiece style)' if model.get('byte_fallback') else ''}"
        )
    pre = _pre_tokenizer(tokenizer.get("pre_tokenizer"), path)
    by_id: dict[int, tuple[str, int]] = {i: (token, TokenType.NORMAL) for token, i in model["vocab"].items()}
    for added in tokenizer.get("added_tokens", []):
        by_id[added["id"]] = (
            added["content"],
            TokenType.CONTROL if added["special"] else TokenType.USER_DEFINED,
        )
    if max(by_id) >= vocab_size:
        raise ValueError(
            f"model_dir: the tokenizer has token id {max(by_id)}, beyond the model's vocab_size {vocab_size}"
        )
    tokens, types = [], []
    for i in range(vocab_size):
        token, kind = by_id.get(i, (f"[PAD{i}]", TokenType.UNUSED))
        tokens.append(token)
        types.append(int(kind))
    return Vocabulary(tokens, types, pre)


def _pre_tokenizer(spec: dict | None, path: Path) -> str:
    """llama.cpp's name (``tokenizer.ggml.pre``) for the tokenizer's split, or a clear refusal."""
    if spec and spec.get("type") == "ByteLevel" and spec.get("use_regex", True):
        return "gpt-2"
    if spec and spec.get("type") == "Sequence":
        steps = spec.get("pretokenizers", [])
        kinds = [step.get("type") for step in steps]
        if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
            regex = steps[0].get("pattern", {}).get("Regex")
            if regex in PRE_TOKENIZER_REGEXES:
                return PRE_TOKENIZER_REGEXES[regex]
    raise ValueError(
        f"model_dir: {path}: its pre_tokenizer is not one llama.cpp is known to split the same way "
        "(supported: GPT-2's byte-level split, Llama 3's and Qwen2's regex)"
    )
