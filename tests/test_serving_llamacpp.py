"""The GGUF export run by the real llama.cpp (llama-cpp-python): same tokens, greedy text and perplexity.

Needs llama-cpp-python (built from source: `.ci/engine_llamacpp.sh` makes and caches its venv and
runs these tests there); skipped elsewhere unless LORAPRUNE_EXPECT_ENGINE=llamacpp says it must run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_path
from tiny_models import pruned_by_magnitude
from transformers import (
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import loraprune
from loraprune.export import export_gguf
from loraprune.io import load_tokenizer

pytestmark = pytest.mark.serving

if os.environ.get("LORAPRUNE_EXPECT_ENGINE") == "llamacpp":
    import llama_cpp
else:
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (.ci/engine_llamacpp.sh)"
    )

NEW_TOKENS = 32
PROMPTS = [
    "The history of the city begins",
    "In 1998, the team won 3 games and lost 12 ; the coach said",
    " = Valkyria Chronicles III = \n\n Senjō no Valkyria 3 : Unrecorded Chronicles",
    "She didn't know what they'd do, so she asked: \"Why?\"",
]
PPL_WINDOWS, PPL_SEQ_LEN = 6, 256
# Relative perplexity difference to transformers fp32 allowed per GGUF type (f32 is the 1%).
PPL_TOLERANCE = {"f32": 0.01, "f16": 0.01, "q8_0": 0.02}
# (fixture, ratio, gqa_unit): the dense fixtures, and 20%/50% pruned MHA and GQA ones
CASES = {
    "mha-dense": ("tiny-llama", 0.0, None),
    "mha-20": ("tiny-llama", 0.2, "kv_group"),
    "mha-50": ("tiny-llama", 0.5, "kv_group"),
    "gqa-dense": ("tiny-llama-gqa", 0.0, None),
    "gqa-20-kv_group": ("tiny-llama-gqa", 0.2, "kv_group"),
    "gqa-50-kv_group": ("tiny-llama-gqa", 0.5, "kv_group"),
    "gqa-50-q_head": ("tiny-llama-gqa", 0.5, "q_head"),
}


def engine(path: Path, n_ctx: int = 512) -> llama_cpp.Llama:
    """llama.cpp with an f32 KV cache (its default f16 cache alone moves logits by ~3e-4)."""
    return llama_cpp.Llama(
        str(path),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_threads=2,
        logits_all=True,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        verbose=False,
    )


def llama_cpp_greedy(llm: llama_cpp.Llama, prompt: list[int], new_tokens: int, eos: int | None) -> list[int]:
    """Greedy continuation, EOS suppressed as transformers' min_new_tokens does."""
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(new_tokens):
        scores = np.array(llm.scores[llm.n_tokens - 1])
        if eos is not None:
            scores[eos] = -np.inf
        out.append(int(scores.argmax()))
        llm.eval([out[-1]])
    return out


def transformers_greedy(model, prompt: list[int], new_tokens: int, eos: int | None) -> list[int]:
    generated = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=eos if eos is not None else 0,
    )
    return generated[0, len(prompt) :].tolist()


def nll_llama_cpp(llm: llama_cpp.Llama, window: list[int]) -> float:
    llm.reset()
    llm.eval(window)
    logits = torch.from_numpy(np.array(llm.scores[: len(window) - 1], dtype=np.float64))
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(window[1:]), reduction="sum"))


@torch.no_grad()
def nll_transformers(model, window: list[int]) -> float:
    logits = model(input_ids=torch.tensor([window])).logits[0, :-1].double()
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(window[1:]), reduction="sum"))


def wikitext_windows(tokenizer, path: Path) -> list[list[int]]:
    ids = tokenizer(path.read_text()[:200_000])["input_ids"]
    return [ids[i * PPL_SEQ_LEN : (i + 1) * PPL_SEQ_LEN] for i in range(PPL_WINDOWS)]


class Exports:
    """Per case, built on first use: the Hugging Face folder, its transformers fp32 model and GGUF files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.folders: dict[str, Path] = {}
        self.models: dict[str, torch.nn.Module] = {}
        self.files: dict[tuple[str, str], Path] = {}

    def folder(self, case: str) -> Path:
        if case not in self.folders:
            fixture, ratio, gqa_unit = CASES[case]
            source = shared_path("fixtures", fixture)
            if ratio == 0:
                self.folders[case] = source
            else:  # magnitude scores and one prune step: a pruned model in seconds (quality is not the point)
                model = pruned_by_magnitude(loraprune.load_model(source), ratio, gqa_unit=gqa_unit)
                folder = self.root / case
                model.save_pretrained(folder)
                load_tokenizer(source).save_pretrained(folder)
                self.folders[case] = folder
        return self.folders[case]

    def model(self, case: str) -> torch.nn.Module:
        if case not in self.models:
            self.models[case] = loraprune.load_model(self.folder(case), dtype="float32").eval()
        return self.models[case]

    def gguf(self, case: str, outtype: str) -> Path:
        if (case, outtype) not in self.files:
            out = self.root / f"{case}-{outtype}.gguf"
            export_gguf(self.folder(case), out, outtype=outtype)
            self.files[case, outtype] = out
        return self.files[case, outtype]


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> Exports:
    return Exports(tmp_path_factory.mktemp("llamacpp"))


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_equal_transformers_at_f32(case, exports):
    model, tokenizer = exports.model(case), load_tokenizer(exports.folder(case))
    llm = engine(exports.gguf(case, "f32"))
    eos = tokenizer.eos_token_id
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        assert llm.tokenize(prompt.encode(), add_bos=True) == ids, prompt  # same tokenizer in both engines
        assert llama_cpp_greedy(llm, ids, NEW_TOKENS, eos) == transformers_greedy(
            model, ids, NEW_TOKENS, eos
        ), prompt


@pytest.mark.parametrize(
    ("case", "outtype"),
    [(case, "f32") for case in CASES] + [("mha-50", "f16"), ("mha-50", "q8_0"), ("gqa-50-q_head", "q8_0")],
)
def test_perplexity_matches_transformers_fp32(case, outtype, exports, wikitext_test):
    model, tokenizer = exports.model(case), load_tokenizer(exports.folder(case))
    windows = wikitext_windows(tokenizer, wikitext_test)
    llm = engine(exports.gguf(case, outtype), n_ctx=PPL_SEQ_LEN)
    tokens = sum(len(w) - 1 for w in windows)
    reference = math.exp(sum(nll_transformers(model, w) for w in windows) / tokens)
    served = math.exp(sum(nll_llama_cpp(llm, w) for w in windows) / tokens)
    print(f"{case} {outtype}: perplexity transformers fp32 {reference:.4f}, llama.cpp {served:.4f}")
    assert abs(served / reference - 1) <= PPL_TOLERANCE[outtype], (reference, served)


# multipliers of the size Granite 3.x checkpoints use (folded into LLaMA weights at compaction)
GRANITE = {
    "embedding_multiplier": 12.0,
    "attention_multiplier": 0.015625,
    "residual_multiplier": 0.22,
    "logits_scaling": 8.0,
}


def random_model(family: str, rope: dict | None = None) -> torch.nn.Module:
    """A small random model with the fixture's vocabulary (so it has a real tokenizer), GQA, 3 layers;
    Qwen3's head_dim 32 is not hidden/heads."""
    config_cls, model_cls, extra = {
        "llama": (LlamaConfig, LlamaForCausalLM, {}),
        "llama-bias": (LlamaConfig, LlamaForCausalLM, {"attention_bias": True, "mlp_bias": True}),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"tie_word_embeddings": True}),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"tie_word_embeddings": True, "hidden_size": 96}),
        "granite": (GraniteConfig, GraniteForCausalLM, GRANITE),
    }[family]
    config = config_cls(
        **{
            "vocab_size": 8192,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "max_position_embeddings": 512,
            "tie_word_embeddings": False,
            "rope_parameters": {"rope_theta": 10000.0, **(rope or {"rope_type": "default"})},
            **extra,
        }
    )
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2 or name.endswith("bias"):
                param.normal_(0, 0.1)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):  # Qwen3's per-head norms
                param.normal_(1, 0.2)
    return model


def saved_pruned_and_exported(model, tiny_llama_dir, tmp_path):
    """``model`` saved with the fixture's tokenizer, reloaded (as its saved config builds it), and its f32 GGUF."""
    model.save_pretrained(tmp_path / "model")
    load_tokenizer(tiny_llama_dir).save_pretrained(tmp_path / "model")
    model = loraprune.load_model(tmp_path / "model").eval()
    return model, export_gguf(tmp_path / "model", tmp_path / "m.gguf", outtype="f32").path


def served_logit_error(llm, model, tokens: list[int]) -> float:
    """Max |llama.cpp − transformers| over every position's logits, relative to the largest logit."""
    llm.eval(tokens)
    served = torch.from_numpy(np.array(llm.scores[: len(tokens)]))
    with torch.no_grad():
        reference = model(input_ids=torch.tensor([tokens])).logits[0]
    return float((served - reference).abs().max() / reference.abs().max())


@pytest.mark.parametrize(
    ("family", "rope"),
    [
        ("qwen2", None),  # q/k/v biases (permuted with q/k), tied embeddings
        (
            "llama",
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
        ("llama", {"rope_type": "linear", "factor": 2.0}),
    ],
)
def test_biases_tied_embeddings_and_scaled_rope_in_llama_cpp(family, rope, tiny_llama_dir, tmp_path):
    model = pruned_by_magnitude(random_model(family, rope), 0.5, layers=(0, 1))  # layer 2 stays whole
    model, path = saved_pruned_and_exported(model, tiny_llama_dir, tmp_path)  # RoPE from the saved config
    llm = engine(path)
    tokens = torch.randint(3, 8192, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    error = served_logit_error(llm, model, tokens)
    assert error < 1e-4, error
    assert llama_cpp_greedy(llm, tokens[:20], 16, None) == transformers_greedy(model, tokens[:20], 16, None)


SPLITS = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
TOKENIZER_TEXTS = [
    "Hello world! It's 2024, and we've 12345 items... costing $3.50 each.",
    "  leading spaces\n\nnew lines\ttabs   and   runs of spaces  ",
    "I'LL SHOUT: DON'T, WON'T, can't; 3.14159 ≈ π — naïve café résumé",
    "code: def f(x):\n    return x**2 + 1  # 2nd line\r\n",
]


@pytest.mark.parametrize("pre", list(SPLITS))
def test_llama3_and_qwen2_splits_tokenize_as_transformers(pre, tiny_llama_dir, tmp_path):
    """The fixture's BPE with Llama 3's or Qwen2's split: llama.cpp, told the pre name, splits the same."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, folder)
    (folder / "tokenizer.json").chmod(0o644)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": SPLITS[pre]}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ],
    }
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    path = export_gguf(folder, tmp_path / "m.gguf", outtype="f16").path
    hf = load_tokenizer(folder)
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    for text in TOKENIZER_TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True) == hf(text)["input_ids"], text


@pytest.mark.parametrize(("family", "architecture"), [("qwen3", "openelm"), ("granite", "deci")])
def test_pruned_qwen3_and_granite_give_transformers_greedy_tokens_at_f32(
    family, architecture, tiny_llama_dir, tmp_path
):
    """A tied Qwen3 through llama.cpp's openelm; Granite folded into LLaMA, through deci."""
    model = pruned_by_magnitude(random_model(family), 0.5, layers=(0, 1))  # layer 2 stays whole
    model, path = saved_pruned_and_exported(model, tiny_llama_dir, tmp_path)
    assert gguf_architecture(path) == architecture
    llm = engine(path)
    tokens = torch.randint(3, 8192, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    error = served_logit_error(llm, model, tokens)
    print(
        f"{family} ({architecture}): llama.cpp f32 vs transformers fp32, max relative logit difference {error:.3g}"
    )
    assert error < 1e-4, error
    prompt = tokens[:20]
    assert llama_cpp_greedy(llm, prompt, NEW_TOKENS, None) == transformers_greedy(
        model, prompt, NEW_TOKENS, None
    )


def test_refit_with_compensated_biases_gives_transformers_logits(tiny_llama_dir, tmp_path):
    """``--reconstruct`` on a LLaMA with o_proj/down_proj biases rewrites those biases: llama.cpp serves them."""
    from loraprune import LoraPruneConfig, LoraPruner
    from loraprune.refit import reconstruct

    model = random_model("llama-bias")
    pruner = LoraPruner(model, LoraPruneConfig(ratio=0.5, criterion="magnitude", layers=(0, 1)))
    pruner.update_scores()
    pruner.prune()
    model.eval()
    original = model.model.layers[0].mlp.down_proj.bias.detach().clone()
    windows = torch.randint(3, 8192, (8, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reconstruct(model, windows, batch_size=4)
    model = pruner.compact().eval()
    assert not torch.equal(model.model.layers[0].mlp.down_proj.bias, original)  # compensated
    model, path = saved_pruned_and_exported(model, tiny_llama_dir, tmp_path)
    llm = engine(path)
    tokens = torch.randint(3, 8192, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    error = served_logit_error(llm, model, tokens)
    assert error < 1e-4, error


def gguf_architecture(path: Path) -> str:
    import gguf

    return gguf.GGUFReader(path).fields["general.architecture"].contents()


def test_pruned_phi3_gives_transformers_greedy_tokens_through_deci_at_f32(tiny_llama_dir, tmp_path):
    """Phi-3 / Phi-4: fused qkv_proj and gate_up_proj, exported split into deci's separate tensors with
    each layer's own counts (default RoPE over whole heads, as in Phi-3-mini 4k and Phi-4)."""
    config = Phi3Config(
        vocab_size=8192,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = Phi3ForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                param.normal_(0, 0.1)
    model = pruned_by_magnitude(model, 0.5, layers=(0, 1))  # layer 2 stays whole
    assert type(model.model.layers[0].self_attn.qkv_proj) is torch.nn.Linear  # fused again
    model, path = saved_pruned_and_exported(model, tiny_llama_dir, tmp_path)
    assert gguf_architecture(path) == "deci"
    llm = engine(path)
    tokens = torch.randint(3, 8192, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    error = served_logit_error(llm, model, tokens)
    print(f"phi3 (deci): llama.cpp f32 vs transformers fp32, max relative logit difference {error:.3g}")
    assert error < 1e-4, error
    prompt = tokens[:20]
    assert llama_cpp_greedy(llm, prompt, NEW_TOKENS, None) == transformers_greedy(
        model, prompt, NEW_TOKENS, None
    )
