"""Export a (pruned or dense) checkpoint to GGUF for llama.cpp.

llama.cpp's ``deci`` architecture builds every layer from per-layer arrays
(``attention.head_count``, ``attention.head_count_kv``, ``feed_forward_length``), so layers of
different widths, any per-layer GQA ratio and unpruned layers all load in stock llama.cpp;
otherwise it computes what the ``llama`` architecture computes (RMSNorm, SwiGLU, RoPE on
adjacent pairs, optional projection biases). llama.cpp's own converter writes one global head
count, so the file is written here with gguf-py. The model's family picks the architecture
(:mod:`loraprune.families`): ``deci`` for the LLaMA-shaped families, ``openelm`` for a Qwen3 with
tied embeddings (:mod:`loraprune.export.openelm`), or a refusal that says why there is none.

Conventions, as llama.cpp's converter follows them for Llama: q/k rows (and biases) are permuted
from Hugging Face's rotate-half layout to adjacent pairs, with each layer's own head counts;
``key_length`` = ``value_length`` = ``rope.dimension_count`` = head_dim; scaled RoPE
(``linear``, ``llama3``) becomes the per-frequency ``rope_freqs`` tensor; a tied output reuses
``token_embd``. What llama.cpp cannot compute the same way is refused before anything is written.

Types: gguf-py writes f32, f16, bf16 and the legacy block types (q8_0, q4_0, q4_1, q5_0, q5_1);
every other llama.cpp file type (the K-quants, IQ types) is written at full precision, then
quantized by llama.cpp's own quantizer (``llama_model_quantize`` of llama-cpp-python), which
chooses its per-tensor mix as it does for any model. A model read from a GGUF file records the
file's type in its config (``gguf_source``): by default the export writes that type again.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

# Written here with gguf-py; any other llama.cpp file type goes through llama.cpp's quantizer.
OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
# llama.cpp keeps the output matrix of these types at >= 6 bits (Q6_K, or Q8_0 when its rows are not
# a multiple of 256); gguf-py cannot write Q6_K, so it is written Q8_0.
LOW_BIT_OUTTYPES = ("q4_0", "q4_1", "q5_0", "q5_1")
GGUF_SOURCE_KEY = "gguf_source"  # loraprune.sources records a GGUF input's type under this config key
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
    # matrices stored at a type of smaller blocks than the file's own (f16 in a q8_0 file, Q5_0 or
    # Q8_0 in a K-quant one), by name: their rows are not a multiple of ``block``, so they are bigger
    # and slower than the rest
    fallback: dict[str, str]
    block: int  # the block size of the file's own type (256 for the K-quants, 32 for q8_0, 1 for f16)
    note: str | None = None  # why ``outtype`` is not the type the model's GGUF source had


@dataclass(frozen=True)
class Vocabulary:
    tokens: list[str]
    token_types: list[int]
    pre: str


def export_gguf(
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    outtype: str | None = None,
    overwrite: bool = False,
    name: str | None = None,
) -> GGUFExport:
    """Write ``model_dir`` (a Hugging Face folder, pruned or dense) as a GGUF file that llama.cpp runs.

    ``outtype``: the matrices' type (norms and ``rope_freqs`` stay f32): one of :data:`OUTTYPES`,
    or another llama.cpp file type (``q4_k_m``, ``q6_k``, ...) that llama-cpp-python's quantizer
    writes. Default: the type of the GGUF file the model was read from (``gguf_source`` in its
    config), else ``f16``; where that type needs llama-cpp-python and it is not installed, ``q8_0``
    is written and ``note`` says why. The block types need rows that are multiples of their block
    (32 for q8_0, 256 for the K-quants); a matrix whose rows are not (a pruned ``down_proj``: prune
    with ``--round-to``) is stored at a type of smaller blocks (f16 here; llama.cpp's quantizer picks
    Q5_0, Q5_1 or Q8_0) and listed in ``fallback``. ``name``: ``general.name`` (default: the folder's name).
    Bad input raises before anything is written; the file appears complete or not at all.
    """
    gguf = _import_gguf()
    from loraprune.export.openelm import openelm_tensors
    from loraprune.families import family
    from loraprune.fused import split_fused
    from loraprune.io import check_model_dir, load_model
    from loraprune.structures import decoder_layers, head_dim, layer_shape

    path = check_model_dir(model_dir)
    config = json.loads((path / "config.json").read_text())
    # the family's llama.cpp architecture, or its refusal saying why there is none
    architecture = family(config["model_type"], "model_dir").gguf_architecture(config)
    outtype, note = _choose_outtype(gguf, outtype, config)
    out = check_out(out, outtype, overwrite)
    _check_config(config)
    vocab = read_vocabulary(path, config["vocab_size"])
    # llama.cpp quantizes from a full-precision file in the model's own precision
    written = outtype if outtype in OUTTYPES else _FULL_PRECISION[_saved_dtype(config)]

    model = load_model(path, dtype=_saved_dtype(config)).eval()
    split_fused(model)  # a family's fused matrices (Phi-3's qkv_proj) as the separate tensors deci reads
    layers = range(len(decoder_layers(model)))
    shapes = [layer_shape(model, i) for i in layers]
    dim = head_dim(model)
    rope_freqs = _rope_freq_factors(model, config, dim)
    hf_config = model.config
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if architecture == "openelm":
        if rope_freqs is not None:
            raise ValueError("model_dir: scaled RoPE is not supported in llama.cpp's openelm (no rope_freqs)")
        tensors = openelm_tensors(model, gguf, len(shapes))
    else:
        tensors = _gguf_tensors(model, gguf, len(shapes), shapes, tied)
    if rope_freqs is not None:
        tensors["rope_freqs.weight"] = rope_freqs
    output_name = "token_embd.weight" if tied else "output.weight"

    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    quantized = None
    try:
        writer = gguf.GGUFWriter(tmp, architecture)
        writer.add_name(name or path.resolve().name)
        writer.add_file_type(_file_type(gguf, written))
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
        for tensor_name, array in tensors.items():
            tensor_type = "q8_0" if written in LOW_BIT_OUTTYPES and tensor_name == output_name else written
            data, raw_dtype = _encode(gguf, array, tensor_type)
            writer.add_tensor(tensor_name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        if written != outtype:
            quantized = tmp + ".quantized"
            _llama_cpp_quantize(gguf, tmp, quantized, outtype)
            os.replace(quantized, tmp)
        fallback, block = _fallback(gguf, tmp, outtype)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 -> an ordinary file's mode
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        if quantized is not None:
            Path(quantized).unlink(missing_ok=True)
        raise
    return GGUFExport(out, outtype, len(tensors), fallback, block, note)


def _fallback(gguf, path: str, outtype: str) -> tuple[dict[str, str], int]:
    """The matrices stored at a type of smaller blocks than ``outtype``'s (or the file's largest), and that size."""
    blocks = {
        tensor.name: (tensor.tensor_type, gguf.GGML_QUANT_SIZES[tensor.tensor_type][0])
        for tensor in gguf.GGUFReader(path).tensors
        if len(tensor.shape) == 2
    }
    name = outtype.upper()
    nominal = next(  # q8_0 -> Q8_0; a K-quant mix such as q4_k_m -> Q4_K
        (
            gguf.GGML_QUANT_SIZES[kind][0]
            for kind in gguf.GGMLQuantizationType
            if kind.name in (name, name.rsplit("_", 1)[0])
        ),
        1,
    )
    block = max([nominal, *(size for _, size in blocks.values())])
    return {name: kind.name for name, (kind, size) in blocks.items() if size < block}, block


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


def outtype_of(file_type: str) -> str:
    """The outtype of a llama.cpp file type name: ``MOSTLY_Q4_K_M`` -> ``q4_k_m``, ``ALL_F32`` -> ``f32``."""
    return file_type.removeprefix("MOSTLY_").removeprefix("ALL_").lower()


def llama_cpp_outtypes(gguf) -> tuple[str, ...]:
    """The llama.cpp file types written through its quantizer: every one gguf-py cannot write."""
    names = (outtype_of(t.name) for t in gguf.LlamaFileType)
    return tuple(n for n in names if n not in OUTTYPES and n != "guessed")


def check_out(out: str | os.PathLike, outtype: str | None, overwrite: bool) -> Path:
    """The checked output path, and ``outtype`` unless ``None`` (with what writing it needs)."""
    quantizer_types = llama_cpp_outtypes(_import_gguf())
    if outtype is not None and outtype not in OUTTYPES + quantizer_types:
        raise ValueError(
            f"outtype must be one of {', '.join(OUTTYPES)} (written here), or a llama.cpp type written by "
            f"its quantizer ({', '.join(quantizer_types)}); got {outtype!r}"
        )
    if outtype in quantizer_types and not _has_llama_cpp():
        raise ImportError(
            f"outtype {outtype} is written by llama.cpp's quantizer: pip install llama-cpp-python "
            f"(or export {', '.join(OUTTYPES)} here)"
        )
    out = Path(out)
    if out.is_dir():
        raise IsADirectoryError(f"out: {out} is a directory; give the .gguf file to write")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"out: the folder {out.parent} does not exist")
    if out.exists() and not overwrite:
        raise FileExistsError(f"out: {out} exists (overwrite=True, --overwrite, replaces it)")
    return out


def _choose_outtype(gguf, outtype: str | None, config: dict) -> tuple[str, str | None]:
    """The type to write (by default the GGUF source's, else f16) and, where it is not the source's, why."""
    if outtype is not None:
        return outtype, None
    source_type = (config.get(GGUF_SOURCE_KEY) or {}).get("file_type", "")
    outtype = outtype_of(source_type) or "f16"
    if outtype not in OUTTYPES + llama_cpp_outtypes(gguf):
        return "f16", f"the source's type {source_type} is not one llama.cpp writes; wrote f16"
    if outtype not in OUTTYPES and not _has_llama_cpp():
        return "q8_0", (
            f"the source was {outtype}, which llama.cpp's quantizer writes: pip install llama-cpp-python "
            f"for it (or quantize this file with llama.cpp's llama-quantize); wrote q8_0"
        )
    return outtype, None


def _has_llama_cpp() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def _llama_cpp_quantize(gguf, source: str, out: str, outtype: str) -> None:
    """llama.cpp's own quantizer (it picks the per-tensor types of ``outtype`` as for any model)."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _file_type(gguf, outtype)
    if llama_cpp.llama_model_quantize(source.encode(), out.encode(), ctypes.byref(params)) != 0:
        raise ValueError(
            f"outtype {outtype}: llama.cpp's quantizer refused the file (its log above says why)"
        )


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
    """The bytes/array to write and its GGML type: norms and 1-D tensors stay f32, block types need
    rows that are a multiple of the block (else f16)."""
    types = gguf.GGMLQuantizationType
    if array.ndim < 2 or outtype == "f32":
        return array.astype(np.float32), types.F32
    if outtype == "f16":
        return array.astype(np.float16), types.F16
    ggml_type = types[outtype.upper()]
    if array.shape[-1] % gguf.GGML_QUANT_SIZES[ggml_type][0]:
        return array.astype(np.float16), types.F16
    return gguf.quants.quantize(array, ggml_type), ggml_type


_FULL_PRECISION = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def _file_type(gguf, outtype: str) -> int:
    """llama.cpp's ``general.file_type`` of ``outtype`` (``f32`` is ALL_F32, ``q4_k_m`` MOSTLY_Q4_K_M)."""
    return int(gguf.LlamaFileType["ALL_F32" if outtype == "f32" else f"MOSTLY_{outtype.upper()}"])


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
