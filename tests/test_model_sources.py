"""MODEL as users name it: a Hub id (from the cache, offline), a GGUF file, and the errors for each."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import huggingface_hub
import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from gguf_files import write_llama_gguf
from huggingface_hub import constants
from huggingface_hub.errors import GatedRepoError
from transformers import AutoTokenizer

from loraprune.cli import main
from loraprune.io import load_model
from loraprune.sources import load_gguf

REVISION = "0123456789abcdef0123456789abcdef01234567"
RUN = ["--ratio", "0.5", "--steps", "2", "--prune-every", "1", "--seq-len", "32", "--batch-size", "2"]
RUN += ["--warmup", "0", "--cooldown", "0", "--quiet"]


def lay_out_hub_cache(hf_home: Path, repo_id: str, model_dir: Path) -> Path:
    """``repo_id`` as a machine that downloaded it has it: ``hub/models--org--name/snapshots/<commit>``."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    for file in model_dir.iterdir():
        (snapshot / file.name).symlink_to(file)  # the cache links its snapshots to blobs too
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, tiny_llama_dir, monkeypatch):
    """HF_HOME in tmp_path holding org/tiny-llama, HF_HUB_OFFLINE=1 (for this process too)."""
    hf_home = tmp_path / "hf"
    lay_out_hub_cache(hf_home, "org/tiny-llama", tiny_llama_dir)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hf_home


def test_hub_id_from_the_cache_offline_in_a_fresh_process(offline_hub):
    """As on a machine that downloaded the model before: the environment alone points at the cache."""
    result = subprocess.run(
        [sys.executable, "-m", "loraprune.cli", "info", "org/tiny-llama", "--json"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["parameters"] == 16_913_280
    assert info["source"]["kind"] == "hub" and info["source"]["revision"] == REVISION


def test_eval_a_hub_id_at_a_revision(offline_hub, wikitext_test, capsys):
    argv = ["eval", "org/tiny-llama", "--data", str(wikitext_test), "--seq-len", "32", "--max-windows", "2"]
    assert main([*argv, "--revision", REVISION, "--json", "--quiet"]) == 0
    hub = json.loads(capsys.readouterr().out)
    assert main([*argv, "--revision", "v2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "org/tiny-llama" in err and "'v2'" in err and "HF_HUB_OFFLINE" in err, err
    assert np.isfinite(hub["perplexity"])


def test_a_hub_id_neither_cached_nor_reachable_is_named(offline_hub, tmp_path, calib_text, capsys):
    out = tmp_path / "out"
    assert main(["prune", "org/nope", "--data", str(calib_text), "--out", str(out), *RUN]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "MODEL: org/nope" in err and "HF_HUB_OFFLINE" in err, err
    assert str(offline_hub / "hub") in err and not out.exists()


def test_a_gated_repository_names_the_token(monkeypatch, capsys):
    gated = GatedRepoError.__new__(GatedRepoError)  # its constructor wants an HTTP response
    Exception.__init__(gated, "401 Client Error: access to model org/gated is restricted")

    def refuse(*args, **kwargs):
        raise gated

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert main(["info", "org/gated"]) == 2
    err = capsys.readouterr().err
    assert "org/gated is a gated repository" in err and "HF_TOKEN" in err and "no Hugging Face token" in err


@pytest.mark.parametrize(
    ("model", "extra", "message"),
    [
        ("{tmp}/nope", [], "MODEL: {tmp}/nope does not exist"),
        ("{tmp}/nope.gguf", [], "MODEL: {tmp}/nope.gguf does not exist"),
        ("{fixture}", ["--revision", "main"], "--revision: MODEL {fixture} is a local path"),
        ("{tmp}/notes.txt", [], "is a file but not a .gguf file"),
        ("{tmp}/garbage.gguf", [], "is not a readable GGUF file"),
    ],
)
def test_bad_model_names_one_error(model, extra, message, tmp_path, tiny_llama_dir, capsys):
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "garbage.gguf").write_bytes(b"not a gguf file at all")
    names = {"tmp": tmp_path, "fixture": tiny_llama_dir}
    assert main(["info", model.format(**names), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message.format(**names) in err and len(err.splitlines()) == 1, err


# --- GGUF input -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """tiny-llama as llama.cpp files: exact (F32), Q4_1 with a Q8_0 output (as llama.cpp writes Q4_1)."""
    folder = tmp_path_factory.mktemp("gguf")
    write_llama_gguf(tiny_llama_dir, folder / "tiny-f32.gguf", "F32")
    write_llama_gguf(tiny_llama_dir, folder / "tiny-q4_1.gguf", "Q4_1", output_qtype="Q8_0")
    return folder


def test_a_gguf_file_reads_as_its_model_and_tokenizer(gguf_dir, tiny_llama_dir):
    model, tokenizer = load_gguf(gguf_dir / "tiny-f32.gguf", "float32")
    reference = load_model(tiny_llama_dir)
    reference_tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    text = "In 1998, the team won 3 games <unk> and lost 12 ; the coach said </s>"
    ids = reference_tokenizer(text, return_tensors="pt").input_ids
    assert tokenizer(text).input_ids == ids[0].tolist()
    assert len(tokenizer) == reference.config.vocab_size  # nothing added past the embedding
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    assert model.config.gguf_source["file_type"] == "ALL_F32"
    bf16, _ = load_gguf(gguf_dir / "tiny-q4_1.gguf", "bfloat16")
    assert bf16.dtype == torch.bfloat16 and bf16.config.gguf_source["file_type"] == "MOSTLY_Q4_1"


def test_info_of_a_gguf_file(gguf_dir, capsys):
    assert main(["info", str(gguf_dir / "tiny-q4_1.gguf"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == 16_913_280 and info["source"]["kind"] == "gguf"


def gguf_types(path: Path) -> tuple[str, dict[str, str]]:
    reader = gguf.GGUFReader(path)
    file_type = gguf.LlamaFileType(int(reader.get_field("general.file_type").contents())).name
    return file_type, {t.name: t.tensor_type.name for t in reader.tensors}


def test_prune_a_gguf_file_then_export_it_at_its_type(gguf_dir, tmp_path, calib_text, capsys):
    out = tmp_path / "pruned"
    model = str(gguf_dir / "tiny-q4_1.gguf")
    assert main(["prune", model, "--data", str(calib_text), "--out", str(out), *RUN]) == 0
    config = json.loads((out / "config.json").read_text())
    report = json.loads((out / "prune_report.json").read_text())
    assert config["gguf_source"]["file_type"] == "MOSTLY_Q4_1" and report["model_source"]["kind"] == "gguf"
    assert report["parameters"]["after"] < report["parameters"]["before"]
    capsys.readouterr()
    assert main(["export", "gguf", str(out), str(tmp_path / "pruned.gguf")]) == 0
    assert "(q4_1," in capsys.readouterr().out
    file_type, types = gguf_types(tmp_path / "pruned.gguf")
    # llama.cpp's Q4_1 mix: the output matrix at >= 6 bits, the rest Q4_1, norms F32
    assert file_type == "MOSTLY_Q4_1" and types.pop("output.weight") == "Q8_0"
    assert {types[n] for n in types if "norm" not in n} == {"Q4_1"}


def test_a_gguf_file_with_a_quantized_base_or_a_device_map(gguf_dir, tmp_path, calib_text, capsys):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "pruned"
    args = ["prune", str(gguf_dir / "tiny-q4_1.gguf"), "--data", str(calib_text), "--out", str(out), *RUN]
    assert main([*args, "--quantize-base", "int8", "--dtype", "bfloat16"]) == 0
    report = json.loads((out / "prune_report.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert report["prune_config"]["quantize_base"] == "int8" and config["dtype"] == "bfloat16"
    assert config["gguf_source"]["file_type"] == "MOSTLY_Q4_1"
    assert main([*args, "--out", str(tmp_path / "mapped"), "--device-map", "auto"]) == 2
    assert "--device-map: a GGUF MODEL" in capsys.readouterr().err and not (tmp_path / "mapped").exists()


def test_a_k_quant_source_without_llama_cpp(gguf_dir, tmp_path, tiny_llama_dir, capsys):
    if importlib.util.find_spec("llama_cpp") is not None:
        pytest.skip("llama-cpp-python is installed: the serving suite checks its quantizer")
    source = write_llama_gguf(tiny_llama_dir, tmp_path / "k.gguf", "Q8_0", file_type="MOSTLY_Q4_K_M")
    capsys.readouterr()
    assert main(["export", "gguf", str(source), str(tmp_path / "out.gguf")]) == 0
    captured = capsys.readouterr()
    assert "the source was q4_k_m" in captured.err and "pip install llama-cpp-python" in captured.err
    assert gguf_types(tmp_path / "out.gguf")[0] == "MOSTLY_Q8_0"
    assert main(["export", "gguf", str(source), str(tmp_path / "k.out.gguf"), "--outtype", "q4_k_m"]) == 2
    err = capsys.readouterr().err
    assert "--outtype q4_k_m" in err and "pip install llama-cpp-python" in err
    assert not (tmp_path / "k.out.gguf").exists()


def write_unreadable_type(path: Path) -> Path:
    """A GGUF whose one matrix is Q8_1, a type llama.cpp uses internally and gguf-py cannot dequantize."""
    writer = gguf.GGUFWriter(str(path), "llama")
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
    data = np.zeros((4, 64 // block_size * block_bytes), np.uint8)  # 4 rows of 64, as bytes
    writer.add_tensor("token_embd.weight", data, raw_dtype=gguf.GGMLQuantizationType.Q8_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# starcoder2: a family loraprune does not prune (a GGUF transformers reads as such is refused by name)
@pytest.mark.parametrize("case", ["starcoder2 architecture", "deci architecture", "Q8_1 tensors"])
def test_an_unreadable_gguf_is_refused_writing_nothing(case, tmp_path, tiny_llama_dir, calib_text, capsys):
    if case == "Q8_1 tensors":
        path, message = write_unreadable_type(tmp_path / "q8_1.gguf"), "holds Q8_1 tensors"
    else:
        architecture = case.split()[0]
        path = write_llama_gguf(tiny_llama_dir, tmp_path / "x.gguf", "Q8_0", architecture=architecture)
        message = f"GGUF architecture {architecture!r}"
    out = tmp_path / "out"
    capsys.readouterr()  # the fixture model's loading
    assert main(["prune", str(path), "--data", str(calib_text), "--out", str(out), *RUN]) == 2
    err = capsys.readouterr().err.strip()
    assert f"MODEL: {path}" in err and message in err and len(err.splitlines()) == 1, err
    assert not out.exists()
