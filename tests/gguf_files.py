"""A GGUF file as llama.cpp's converter writes one (``llama`` architecture), made from a Hugging Face folder.

The tests read it back through loraprune's GGUF input path without the 135M SmolLM2 download:
gguf-py writes the matrices at a legacy type (Q8_0, Q4_1, ...), and ``file_type`` may claim another
type (a K-quant) to exercise what the export does with types gguf-py cannot write.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from loraprune.export.gguf import _gguf_tensors, read_vocabulary
from loraprune.io import load_model
from loraprune.structures import decoder_layers, layer_shape


def write_llama_gguf(
    model_dir: Path,
    out: Path,
    qtype: str = "Q8_0",
    *,
    file_type: str | None = None,
    output_qtype: str | None = None,
    architecture: str = "llama",
) -> Path:
    """``model_dir`` as a ``llama`` GGUF: matrices at ``qtype`` (``output_qtype`` for the output), norms F32."""
    model = load_model(model_dir).eval()
    config = model.config
    shapes = [layer_shape(model, i) for i in range(len(decoder_layers(model)))]
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    tensors = _gguf_tensors(model, gguf, len(shapes), shapes, tied)  # names and q/k order as llama's
    output_name = "token_embd.weight" if tied else "output.weight"
    vocab = read_vocabulary(model_dir, config.vocab_size)
    writer = gguf.GGUFWriter(str(out), architecture)
    writer.add_name(model_dir.name)
    writer.add_file_type(
        gguf.LlamaFileType[file_type or ("ALL_F32" if qtype == "F32" else f"MOSTLY_{qtype}")]
    )
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(len(shapes))
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(shapes[0].head_dim)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=config.vocab_size).add_to_gguf(writer)
    for name, array in tensors.items():
        kind = output_qtype if name == output_name and output_qtype else qtype
        if array.ndim < 2:
            writer.add_tensor(name, array.astype(np.float32))
            continue
        ggml_type = gguf.GGMLQuantizationType[kind]
        if ggml_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            writer.add_tensor(name, array.astype(np.float32 if kind == "F32" else np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, ggml_type), raw_dtype=ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
