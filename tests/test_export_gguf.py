"""GGUF export: what the file holds, read back with gguf-py's reader (no engine needed)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import (
    CONFIGS,
    biased_llama,
    pruned_by_magnitude,
    pruned_tiny_model,
    random_tokens,
    tiny_model,
)
from transformers import AutoModelForCausalLM

import loraprune
from loraprune.cli import main
from loraprune.export import export_gguf
from loraprune.export.gguf import _permute_rows, unpermute_rows
from loraprune.structures import layer_shape

gguf = pytest.importorskip("gguf")

CONFIG_NAMES = list(CONFIGS)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]


def byte_level_tokenizer(
    vocab_size: int, pre_tokenizer: dict | None = None, byte_fallback: bool = False
) -> dict:
    """A small byte-level BPE tokenizer.json: special tokens, single characters and a few merges."""
    alphabet = [chr(c) for c in range(ord("!"), ord("!") + vocab_size - len(SPECIAL_TOKENS) - 3)]
    merged = [("a", "b"), ("ab", "c"), ("d", "e")]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + alphabet + [a + b for a, b in merged])}
    return {
        "version": "1.0",
        "added_tokens": [
            {"id": i, "content": t, "special": True, "normalized": False, "single_word": False}
            | {"lstrip": False, "rstrip": False}
            for i, t in enumerate(SPECIAL_TOKENS)
        ],
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer
        or {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "byte_fallback": byte_fallback,
            "vocab": vocab,
            "merges": [list(pair) for pair in merged],
        },
    }


def save_with_tokenizer(model: torch.nn.Module, folder: Path, **tokenizer_options) -> Path:
    model.save_pretrained(folder)
    tokenizer = byte_level_tokenizer(model.config.vocab_size, **tokenizer_options)
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    )
    return folder


def field(reader, key: str):
    value = reader.fields[key].contents()
    return value


def tensors_of(reader) -> dict:
    return {t.name: t for t in reader.tensors}


def as_float(tensor) -> np.ndarray:
    """A GGUF tensor's values in numpy (out, in) order, dequantized."""
    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.array(data, dtype=np.float32).reshape([int(d) for d in reversed(tensor.shape)])


def assert_matches_model(path: Path, model: torch.nn.Module, atol: float = 0.0) -> None:
    """Every GGUF tensor equals the model's (q/k un-permuted with each layer's own head counts)."""
    reader = gguf.GGUFReader(path)
    tensors = tensors_of(reader)
    shapes = [layer_shape(model, i) for i in range(model.config.num_hidden_layers)]
    state = {k: v.float() for k, v in model.state_dict().items()}
    tied = model.config.tie_word_embeddings
    expected = {
        "token_embd.weight": state["model.embed_tokens.weight"],
        "output_norm.weight": state["model.norm.weight"],
    }
    if not tied:
        expected["output.weight"] = state["lm_head.weight"]
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
    names |= {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    for i in range(len(shapes)):
        prefix = f"model.layers.{i}"
        expected[f"blk.{i}.attn_norm.weight"] = state[f"{prefix}.input_layernorm.weight"]
        expected[f"blk.{i}.ffn_norm.weight"] = state[f"{prefix}.post_attention_layernorm.weight"]
        for hf, ours in names.items():
            part = "self_attn" if hf in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            for kind in ("weight", "bias"):
                key = f"{prefix}.{part}.{hf}.{kind}"
                if key in state:
                    expected[f"blk.{i}.{ours}.{kind}"] = state[key]
    assert set(tensors) == set(expected)
    for name, value in expected.items():
        got = torch.from_numpy(as_float(tensors[name]))
        if ".attn_q." in name or ".attn_k." in name:
            shape = shapes[int(name.split(".")[1])]
            got = unpermute_rows(got, shape.num_heads if ".attn_q." in name else shape.num_kv_heads)
        assert got.shape == value.shape, name
        torch.testing.assert_close(got, value, rtol=0, atol=atol * float(value.abs().max()), msg=name)


def test_refit_biases_of_o_proj_and_down_proj_are_written(tmp_path):
    """--reconstruct compensates an existing o_proj/down_proj bias: the GGUF file carries it."""
    from loraprune import LoraPruneConfig, LoraPruner
    from loraprune.refit import reconstruct

    model = biased_llama(layers=4)
    pruner = LoraPruner(model, LoraPruneConfig(ratio=0.5, criterion="magnitude", layers=(1, 2)))
    pruner.update_scores()
    pruner.prune()
    before = model.model.layers[1].mlp.down_proj.bias.clone()
    reconstruct(model, random_tokens(batch=8, length=16, seed=3), batch_size=4)
    pruned = pruner.compact().eval()
    assert not torch.equal(pruned.model.layers[1].mlp.down_proj.bias, before)
    folder = save_with_tokenizer(pruned, tmp_path / "model")
    export_gguf(folder, tmp_path / "model.gguf", outtype="f32")
    assert_matches_model(tmp_path / "model.gguf", pruned)
    names = set(tensors_of(gguf.GGUFReader(tmp_path / "model.gguf")))
    assert {"blk.1.attn_output.bias", "blk.1.ffn_down.bias"} <= names


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_pruned_tiny_models_round_trip_at_f32(name, tmp_path):
    model = pruned_tiny_model(name)
    folder = save_with_tokenizer(model, tmp_path / "model")
    result = export_gguf(folder, tmp_path / "model.gguf", outtype="f32")
    assert result.path == tmp_path / "model.gguf" and result.fallback == {}
    reader = gguf.GGUFReader(result.path)
    shapes = [layer_shape(model, i) for i in range(4)]
    assert field(reader, "general.architecture") == "deci"
    assert field(reader, "deci.attention.head_count") == [s.num_heads for s in shapes]
    assert field(reader, "deci.attention.head_count_kv") == [s.num_kv_heads for s in shapes]
    assert field(reader, "deci.feed_forward_length") == [s.intermediate_size for s in shapes]
    assert shapes[3].num_heads == CONFIGS[name][1] and shapes[0].num_heads < shapes[3].num_heads
    head_dim = shapes[0].head_dim
    for key in ("attention.key_length", "attention.value_length", "rope.dimension_count"):
        assert field(reader, f"deci.{key}") == head_dim
    assert field(reader, "deci.embedding_length") == model.config.hidden_size
    assert field(reader, "deci.block_count") == 4
    assert field(reader, "deci.context_length") == model.config.max_position_embeddings
    assert math.isclose(
        field(reader, "deci.attention.layer_norm_rms_epsilon"), model.config.rms_norm_eps, rel_tol=1e-6
    )
    assert field(reader, "deci.rope.freq_base") == model.config.rope_parameters["rope_theta"]
    assert_matches_model(result.path, model)


def test_tokenizer_fields(tmp_path):
    model = pruned_tiny_model("llama-gqa-tied")
    folder = save_with_tokenizer(model, tmp_path / "model")
    reader = gguf.GGUFReader(export_gguf(folder, tmp_path / "m.gguf").path)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    by_id = {i: t for t, i in tokenizer["model"]["vocab"].items()}
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert tokens == [by_id[i] for i in range(model.config.vocab_size)]
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[:3] == [gguf.TokenType.CONTROL] * 3 and set(types[3:]) == {gguf.TokenType.NORMAL}
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert field(reader, "tokenizer.ggml.merges") == ["a b", "ab c", "d e"]
    assert field(reader, "tokenizer.ggml.bos_token_id") == 1
    assert field(reader, "tokenizer.ggml.eos_token_id") == 2
    assert "output.weight" not in tensors_of(reader)  # tied: llama.cpp reuses token_embd


@pytest.mark.parametrize(("outtype", "ggml_type"), [("f16", "F16"), ("bf16", "BF16")])
def test_half_precision_outtypes(outtype, ggml_type, tmp_path):
    model = pruned_tiny_model("qwen2-gqa-bias-tied")
    folder = save_with_tokenizer(model, tmp_path / "model")
    result = export_gguf(folder, tmp_path / "m.gguf", outtype=outtype)
    tensors = tensors_of(gguf.GGUFReader(result.path))
    types = gguf.GGMLQuantizationType
    assert tensors["blk.0.attn_q.weight"].tensor_type == types[ggml_type]
    assert tensors["blk.0.attn_norm.weight"].tensor_type == types.F32
    assert tensors["blk.0.attn_q.bias"].tensor_type == types.F32
    assert result.fallback == {}
    assert_matches_model(result.path, model, atol={"f16": 1e-3, "bf16": 8e-3}[outtype])


def test_q8_0_writes_f16_where_rows_are_not_multiples_of_32(tiny_llama_dir, tmp_path):
    model = loraprune.load_model(tiny_llama_dir)
    model = pruned_by_magnitude(model, 0.2)  # layers 0-4 keep 820 of 1024 channels; layer 5 all
    model.save_pretrained(tmp_path / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama_dir / name, tmp_path / "model" / name)
    result = export_gguf(tmp_path / "model", tmp_path / "m.gguf", outtype="q8_0")
    tensors = tensors_of(gguf.GGUFReader(result.path))
    types = gguf.GGMLQuantizationType
    narrow = {f"blk.{i}.ffn_down.weight" for i in range(5)}
    assert model.get_submodule("model.layers.0.mlp.down_proj").in_features % 32 != 0
    assert result.fallback == dict.fromkeys(narrow, "F16") and result.block == 32
    assert {tensors[n].tensor_type for n in narrow} == {types.F16}
    quantized = {n for n, t in tensors.items() if t.tensor_type == types.Q8_0}
    assert quantized == {n for n, t in tensors.items() if len(t.shape) == 2} - narrow
    assert "blk.5.ffn_down.weight" in quantized and "output.weight" in quantized
    assert_matches_model(result.path, model, atol=1e-2)


def test_dense_fixture_round_trip(tiny_llama_dir, tmp_path):
    result = export_gguf(tiny_llama_dir, tmp_path / "dense.gguf", outtype="f32")
    reader = gguf.GGUFReader(result.path)
    assert field(reader, "deci.attention.head_count") == [6] * 6
    assert field(reader, "deci.feed_forward_length") == [1024] * 6
    tokenizer = json.loads((tiny_llama_dir / "tokenizer.json").read_text())
    assert len(field(reader, "tokenizer.ggml.tokens")) == 8192
    assert (
        field(reader, "tokenizer.ggml.tokens")[100]
        == {i: t for t, i in tokenizer["model"]["vocab"].items()}[100]
    )
    assert field(reader, "tokenizer.ggml.add_bos_token") is True
    assert_matches_model(
        result.path, AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    )


def rope_adjacent_pairs(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """llama.cpp's RoPE (NORM): rotate pairs (2i, 2i+1) by position·inv_freq[i]."""
    angle = positions[:, None] * inv_freq[None, :]
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


def rope_rotate_half(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Hugging Face's RoPE: rotate (i, i + d/2) by position·inv_freq[i]."""
    angle = positions[:, None] * inv_freq[None, :]
    cos, sin = (
        torch.cat((angle, angle), -1).cos()[:, None, :],
        torch.cat((angle, angle), -1).sin()[:, None, :],
    )
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def test_permutation_turns_rotate_half_into_adjacent_pairs_per_head():
    """With the permuted rows, llama.cpp's RoPE gives the same q·k as Hugging Face's, head by head."""
    torch.manual_seed(0)
    heads, dim, hidden, tokens = 3, 8, 10, 7
    weight, x = torch.randn(heads * dim, hidden), torch.randn(tokens, hidden)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    positions = torch.arange(tokens).float()
    hf = rope_rotate_half((x @ weight.T).view(tokens, heads, dim), positions, inv_freq)
    ours = rope_adjacent_pairs(
        (x @ _permute_rows(weight, heads).T).view(tokens, heads, dim), positions, inv_freq
    )
    scores = torch.einsum("thd,shd->hts", hf, hf)
    torch.testing.assert_close(torch.einsum("thd,shd->hts", ours, ours), scores)
    assert torch.equal(unpermute_rows(_permute_rows(weight, heads), heads), weight)
    bias = torch.randn(heads * dim)
    assert torch.equal(unpermute_rows(_permute_rows(bias, heads), heads), bias)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 4.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ],
)
def test_scaled_rope_becomes_rope_freqs(rope, tmp_path):
    model = tiny_model("llama-mha-untied")
    model.config.rope_parameters = {"rope_theta": 10000.0, **rope}
    model.save_pretrained(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)  # RoPE from config
    save_with_tokenizer(model, tmp_path / "model")
    tensors = tensors_of(gguf.GGUFReader(export_gguf(tmp_path / "model", tmp_path / "m.gguf").path))
    factors = torch.from_numpy(as_float(tensors["rope_freqs.weight"]))
    dim = layer_shape(model, 0).head_dim
    default = 1.0 / (10000.0 ** (torch.arange(0, dim, 2).float() / dim))
    # llama.cpp divides each frequency by its factor: that must give the model's own frequencies
    torch.testing.assert_close(default / factors, model.model.rotary_emb.inv_freq.float())
    assert float(factors.min()) >= 1.0 and float(factors.max()) == rope["factor"]


def listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        (
            {"rope_parameters": {"rope_theta": 10000.0, "rope_type": "yarn", "factor": 4.0}},
            "rope scaling 'yarn'",
        ),
        (
            {"rope_parameters": {"rope_theta": 10000.0, "rope_type": "dynamic", "factor": 4.0}},
            "rope scaling 'dynamic'",
        ),
    ],
)
def test_unrepresentable_configs_are_refused_writing_nothing(change, message, tmp_path):
    folder = save_with_tokenizer(tiny_model(), tmp_path / "model")
    config = json.loads((folder / "config.json").read_text()) | change
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        export_gguf(folder, tmp_path / "m.gguf")
    assert listing(tmp_path) == {"model"}


def test_bad_input_is_refused_writing_nothing(tmp_path):
    folder = save_with_tokenizer(tiny_model(), tmp_path / "model")
    with pytest.raises(ValueError, match="outtype must be one of"):
        export_gguf(folder, tmp_path / "m.gguf", outtype="q4_k")
    with pytest.raises(FileNotFoundError, match=r"model_dir: .* does not exist"):
        export_gguf(tmp_path / "missing", tmp_path / "m.gguf")
    with pytest.raises(FileNotFoundError, match="out: the folder"):
        export_gguf(folder, tmp_path / "nowhere" / "m.gguf")
    with pytest.raises(IsADirectoryError, match=r"out: .* is a directory"):
        export_gguf(folder, folder)
    assert listing(tmp_path) == {"model"}
    (tmp_path / "m.gguf").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_gguf(folder, tmp_path / "m.gguf")
    assert (tmp_path / "m.gguf").read_text() == "keep me"
    export_gguf(folder, tmp_path / "m.gguf", overwrite=True)
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["general.architecture"].contents() == "deci"


def test_unsupported_tokenizers_are_refused(tmp_path):
    spm = save_with_tokenizer(tiny_model(), tmp_path / "spm", byte_fallback=True)
    with pytest.raises(ValueError, match="byte fallback"):
        export_gguf(spm, tmp_path / "m.gguf")
    unknown_split = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": r"\d+|\w+"}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ],
    }
    other = save_with_tokenizer(tiny_model(), tmp_path / "other", pre_tokenizer=unknown_split)
    with pytest.raises(ValueError, match="pre_tokenizer"):
        export_gguf(other, tmp_path / "m.gguf")
    (other / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json"):
        export_gguf(other, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_a_failure_while_writing_leaves_no_file(tmp_path, monkeypatch):
    folder = save_with_tokenizer(tiny_model(), tmp_path / "model")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(folder, tmp_path / "m.gguf")
    assert listing(tmp_path) == {"model"}


def test_cli_export_gguf(tmp_path, capsys):
    folder = save_with_tokenizer(pruned_tiny_model(), tmp_path / "model")
    out = tmp_path / "m.gguf"
    assert main(["export", "gguf", str(folder), str(out), "--outtype", "q8_0"]) == 0
    captured = capsys.readouterr()
    assert f"wrote {out} (q8_0" in captured.out and "--round-to 32" in captured.err
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert main(["export", "gguf", str(folder), str(out)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--overwrite" in error
    assert main(["export", "gguf", str(tmp_path / "missing"), str(tmp_path / "x.gguf")]) == 2
    assert "MODEL: " in capsys.readouterr().err and not (tmp_path / "x.gguf").exists()
