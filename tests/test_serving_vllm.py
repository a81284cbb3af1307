"""Pruned models served by vLLM give transformers' greedy tokens (`serving`: run by .ci/engine_vllm.sh).

Runs where vLLM is importable (its CPU build lives in its own environment; see .ci/engine_vllm.sh),
with loraprune installed there so that vLLM finds the plugin through its entry point: the tests
never register anything themselves. Engines start in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0, set here) except in the test of vLLM's default multiprocess
engine. fp32 on both sides: tokens must be equal and the chosen tokens' logprobs within
LOGPROB_TOLERANCE; a differing token is accepted only where the reference itself has a near-tie
(its two candidates' logprobs within the tolerance), after which the continuations are not compared.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import shared_path

pytestmark = [
    pytest.mark.serving,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed here"),
]

ENGINE_ENVIRONMENT = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB
    "HF_HUB_OFFLINE": "1",  # else each engine start waits ~30 s on the unreachable hub
}

NEW_TOKENS = 32
LOGPROB_TOLERANCE = 1e-4
PROMPTS = ["The history of the city", "In 1990, the band released", "def main():\n    "]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="module", autouse=True)
def engine_environment():
    saved = dict(os.environ)
    for name, value in ENGINE_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    yield
    os.environ.clear()
    os.environ.update(saved)


def prune(model: torch.nn.Module, ratio: float, gqa_unit: str, out: Path, seed: int = 0) -> list[tuple]:
    """Mask random heads and channels (per-layer ratios ratio/2, ratio, 3·ratio/2 in turn, so that the
    layers differ), compact and save; returns each layer's (heads, KV heads, MLP width)."""
    from loraprune import LoraPruneConfig, LoraPruner
    from loraprune.masks import grow_mask, prune_count

    pruner = LoraPruner(model, LoraPruneConfig(ratio=ratio, gqa_unit=gqa_unit))
    generator = torch.Generator().manual_seed(seed)
    for index, group in enumerate(pruner.groups):
        layer_ratio = min(0.9, ratio * (0.5, 1.0, 1.5)[group.layer % 3])
        scores = torch.rand(group.num_units, generator=generator)
        target = prune_count(group, layer_ratio)
        pruner.set_group_mask(index, grow_mask(pruner.keep[index], scores, target, group.blocks))
    pruned = pruner.compact()
    pruned.save_pretrained(out)
    return [
        (e["num_attention_heads"], e["num_key_value_heads"], e["intermediate_size"])
        for e in pruned.config.pruned_layers
    ]


def load_reference(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    import loraprune  # noqa: F401  (registers the pruned classes with transformers)

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.no_grad()
def reference_greedy(model_dir: Path, prompts: list[list[int]]) -> list[tuple[list[int], torch.Tensor]]:
    """transformers' greedy tokens and the log-softmax row of every step, per prompt."""
    model = load_reference(model_dir)
    results = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        tokens, rows = [], []
        for _ in range(NEW_TOKENS):
            row = torch.log_softmax(model(ids).logits[0, -1].float(), dim=-1)
            token = int(row.argmax())
            tokens.append(token)
            rows.append(row)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        results.append((tokens, torch.stack(rows)))
    return results


def vllm_greedy(model_dir: Path, prompts: list[list[int]]) -> list[tuple[list[int], list[float]]]:
    """vLLM's greedy tokens and their logprobs, per prompt (one engine, started in this process)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=str(model_dir),
        dtype="float32",
        enforce_eager=True,
        max_model_len=128,
        seed=0,
        skip_tokenizer_init=not (model_dir / "tokenizer.json").exists(),
    )
    params = SamplingParams(
        temperature=0.0, max_tokens=NEW_TOKENS, logprobs=1, ignore_eos=True, detokenize=False
    )
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    results = []
    for output in outputs:
        completion = output.outputs[0]
        tokens = list(completion.token_ids)
        results.append(
            (tokens, [step[t].logprob for step, t in zip(completion.logprobs, tokens, strict=True)])
        )
    del llm
    gc.collect()
    return results


def assert_same_greedy(reference, served) -> None:
    for prompt, ((ref_tokens, ref_rows), (tokens, logprobs)) in enumerate(
        zip(reference, served, strict=True)
    ):
        assert len(tokens) == NEW_TOKENS
        for step, (expected, got) in enumerate(zip(ref_tokens, tokens, strict=True)):
            row = ref_rows[step]
            if got != expected:
                gap = float(row[expected] - row[got])
                assert gap < LOGPROB_TOLERANCE, (
                    f"prompt {prompt} step {step}: vLLM chose {got}, transformers {expected} "
                    f"(logprob gap {gap:.3g}, not a tie)"
                )
                break  # a tie broken differently: the continuations differ from here on
            assert abs(float(row[expected]) - logprobs[step]) < LOGPROB_TOLERANCE, (
                f"prompt {prompt} step {step}: logprob {logprobs[step]} vs {float(row[expected])}"
            )


def encode_prompts(model_dir: Path) -> list[list[int]]:
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"))
    bos = json.loads((model_dir / "config.json").read_text()).get("bos_token_id")
    return [
        ([bos] if bos is not None else []) + tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS
    ]


def fixture_model(name: str, ratio: float, gqa_unit: str, out: Path) -> Path:
    """The fixture itself (ratio 0) or a pruned copy of it, with its tokenizer."""
    src = shared_path("fixtures", name)
    if ratio == 0:
        return src
    shapes = prune(load_reference(src), ratio, gqa_unit, out)
    assert len(set(shapes)) > 1, f"expected layers of different sizes, got {shapes}"
    for file in TOKENIZER_FILES:
        shutil.copy(src / file, out / file)
    return out


@pytest.mark.parametrize(
    ("fixture", "ratio", "gqa_unit"),
    [
        ("tiny-llama", 0.0, "kv_group"),
        ("tiny-llama", 0.2, "kv_group"),
        ("tiny-llama", 0.5, "kv_group"),
        ("tiny-llama-gqa", 0.2, "kv_group"),
        ("tiny-llama-gqa", 0.5, "kv_group"),
        ("tiny-llama-gqa", 0.2, "q_head"),
        ("tiny-llama-gqa", 0.5, "q_head"),
    ],
)
def test_fixture_models_give_transformers_greedy_tokens(fixture, ratio, gqa_unit, tmp_path):
    model_dir = fixture_model(fixture, ratio, gqa_unit, tmp_path / "model")
    prompts = encode_prompts(model_dir)
    assert_same_greedy(reference_greedy(model_dir, prompts), vllm_greedy(model_dir, prompts))


# Gemma: a window of 8 (shorter than prompt and continuation), scores scaled by 24 ** -0.5 (not head_dim's)
GEMMA = {"hidden_size": 96, "sliding_window": 8, "query_pre_attn_scalar": 24}
# soft-caps that bend scores and logits of this size (Gemma 2's own: 50 and 30)
GEMMA2_SOFTCAPS = {"attn_logit_softcapping": 10.0, "final_logit_softcapping": 5.0}
GEMMA3_LAYER_TYPES = {"layer_types": ["sliding_attention", "full_attention"] * 2}
# NoPE in every second layer; SmolLM3's own special-token ids lie outside the vocabulary
SMOLLM3 = {"no_rope_layer_interval": 2, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def random_family_model(family: str, out: Path) -> Path:
    """A small random model pruned at 50%, GQA, head size 32 (one the CPU backend has): Mistral, Qwen2
    (q/k/v biases) and Qwen3 (q/k norms, head_dim 32 != hidden/heads; tied or untied, with biases),
    whose vLLM classes differ from LLaMA's, Granite (its multipliers, folded at compaction: served
    as LLaMA), Gemma 2 and Gemma 3 (a window shorter than the prompts, query_pre_attn_scalar, Gemma 2's
    soft-caps; head_dim 32 != hidden/heads) and SmolLM3 (NoPE in every second layer)."""
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        GraniteConfig,
        GraniteForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
        SmolLM3Config,
        SmolLM3ForCausalLM,
    )

    config_cls, model_cls, extra = {
        "mistral": (MistralConfig, MistralForCausalLM, {}),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"tie_word_embeddings": True}),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"hidden_size": 96, "tie_word_embeddings": True}),
        "qwen3-untied": (Qwen3Config, Qwen3ForCausalLM, {"hidden_size": 96}),
        "qwen3-bias": (Qwen3Config, Qwen3ForCausalLM, {"hidden_size": 96, "attention_bias": True}),
        "granite": (
            GraniteConfig,
            GraniteForCausalLM,
            {
                "embedding_multiplier": 12.0,
                "attention_multiplier": 0.015625,
                "residual_multiplier": 0.22,
                "logits_scaling": 8.0,
            },
        ),
        "gemma2": (Gemma2Config, Gemma2ForCausalLM, GEMMA | GEMMA2_SOFTCAPS | {"tie_word_embeddings": True}),
        "gemma2-untied-bias": (Gemma2Config, Gemma2ForCausalLM, GEMMA | {"attention_bias": True}),
        "gemma3": (
            Gemma3TextConfig,
            Gemma3ForCausalLM,
            GEMMA | GEMMA3_LAYER_TYPES | {"tie_word_embeddings": True},
        ),
        "gemma3-untied-bias": (
            Gemma3TextConfig,
            Gemma3ForCausalLM,
            GEMMA | GEMMA3_LAYER_TYPES | {"attention_bias": True},
        ),
        "smollm3": (SmolLM3Config, SmolLM3ForCausalLM, SMOLLM3 | {"tie_word_embeddings": True}),
        "smollm3-untied-bias": (
            SmolLM3Config,
            SmolLM3ForCausalLM,
            SMOLLM3 | {"attention_bias": True, "mlp_bias": True},
        ),
    }[family]
    config = config_cls(
        **{
            "vocab_size": 512,
            "hidden_size": 128,
            "intermediate_size": 192,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "max_position_embeddings": 256,
            "tie_word_embeddings": False,
            **extra,
        }
    )
    torch.manual_seed(0)
    model = model_cls(config).float().eval()
    with torch.no_grad():  # the 0.02 init gives near-uniform logits: ties everywhere
        for name, param in model.named_parameters():
            if param.ndim == 2 or name.endswith("bias"):
                param.normal_(0, 0.1)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                param.normal_(1, 0.2)
    shapes = prune(model, 0.5, "kv_group", out)
    assert len(set(shapes)) > 1
    return out


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_pruned_mistral_and_qwen2_give_transformers_greedy_tokens(family, tmp_path):
    model_dir = random_family_model(family, tmp_path / family)
    prompts = torch.randint(0, 512, (3, 12), generator=torch.Generator().manual_seed(1)).tolist()
    assert_same_greedy(reference_greedy(model_dir, prompts), vllm_greedy(model_dir, prompts))


@pytest.mark.parametrize(
    ("family", "architecture"),
    [
        ("granite", "PrunedLlamaForCausalLM"),
        ("qwen3", "PrunedQwen3ForCausalLM"),
        ("qwen3-untied", "PrunedQwen3ForCausalLM"),
    ],
)
def test_pruned_granite_and_qwen3_give_transformers_greedy_tokens(family, architecture, tmp_path):
    model_dir = random_family_model(family, tmp_path / family)
    assert json.loads((model_dir / "config.json").read_text())["architectures"] == [architecture]
    prompts = torch.randint(0, 512, (3, 12), generator=torch.Generator().manual_seed(1)).tolist()
    assert_same_greedy(reference_greedy(model_dir, prompts), vllm_greedy(model_dir, prompts))


@pytest.mark.parametrize(
    ("family", "architecture"),
    [
        ("gemma2", "PrunedGemma2ForCausalLM"),
        ("gemma2-untied-bias", "PrunedGemma2ForCausalLM"),
        ("gemma3", "PrunedGemma3ForCausalLM"),
        ("gemma3-untied-bias", "PrunedGemma3ForCausalLM"),
        ("smollm3", "PrunedSmolLM3ForCausalLM"),
        ("smollm3-untied-bias", "PrunedSmolLM3ForCausalLM"),
    ],
)
def test_pruned_gemma_and_smollm3_give_transformers_greedy_tokens(family, architecture, tmp_path):
    """12-token prompts and 32 new tokens: past the window of 8 in prefill and in decoding."""
    from vllm.model_executor.models import gemma2, gemma3

    model_dir = random_family_model(family, tmp_path / family)
    assert json.loads((model_dir / "config.json").read_text())["architectures"] == [architecture]
    prompts = torch.randint(0, 512, (3, 12), generator=torch.Generator().manual_seed(1)).tolist()
    assert_same_greedy(reference_greedy(model_dir, prompts), vllm_greedy(model_dir, prompts))
    # the pruned Gemma models bind vLLM's decoder-layer class to theirs for their constructor only
    assert gemma2.Gemma2DecoderLayer.__module__ == gemma2.__name__
    assert gemma3.Gemma3DecoderLayer.__module__ == gemma3.__name__


def test_qwen3_with_attention_bias_is_refused_naming_the_reason(tmp_path):
    """vLLM's Qwen3 attention has no o_proj bias: served, the bias would be dropped without a word."""
    model_dir = random_family_model("qwen3-bias", tmp_path / "qwen3")
    with pytest.raises(Exception, match="attention_bias: vLLM's Qwen3 attention has no o_proj bias"):
        vllm_greedy(model_dir, [[1, 2, 3]])


def test_register_is_idempotent():
    from vllm import ModelRegistry

    from loraprune.integrations.vllm import ARCHITECTURES, register

    register()
    register()
    assert set(ARCHITECTURES) <= set(ModelRegistry.get_supported_archs())


SERVE_SCRIPT = """
    import json, sys
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    if __name__ == "__main__":  # the engine core is a spawned process that imports this file
        model_dir, prompts = sys.argv[1], json.loads(sys.argv[2])
        llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, max_model_len=128)
        params = SamplingParams(temperature=0.0, max_tokens={tokens}, logprobs=1, ignore_eos=True)
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
        served = []
        for output in outputs:
            tokens = list(output.outputs[0].token_ids)
            served.append((tokens, [step[t].logprob for step, t in zip(output.outputs[0].logprobs, tokens)]))
        print("SERVED=" + json.dumps(served))
"""


def test_default_multiprocess_engine_finds_the_plugin(tmp_path):
    """`LLM(PRUNED_DIR)` as a user runs it: vLLM's engine core in its own process, loraprune never
    imported by the script, so every process must get the plugin from the entry point."""
    model_dir = fixture_model("tiny-llama-gqa", 0.5, "kv_group", tmp_path / "model")
    prompts = encode_prompts(model_dir)
    script = tmp_path / "serve.py"
    script.write_text(textwrap.dedent(SERVE_SCRIPT.format(tokens=NEW_TOKENS)))
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    run = subprocess.run(
        [sys.executable, str(script), str(model_dir), json.dumps(prompts)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("SERVED=")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    assert_same_greedy(reference_greedy(model_dir, prompts), json.loads(lines[0].removeprefix("SERVED=")))


def random_phi3_olmo_model(family: str, out: Path) -> Path:
    """A small random Phi-3 (fused qkv_proj/gate_up_proj), OLMo 2 (q/k norms over the whole width,
    rewritten at compaction; attention biases) or OLMo 3 (OLMo 2's layer with a sliding window of 8 in
    layers 0-2) pruned at 50%, GQA, head size 32."""
    from transformers import (
        Olmo2Config,
        Olmo2ForCausalLM,
        Olmo3Config,
        Olmo3ForCausalLM,
        Phi3Config,
        Phi3ForCausalLM,
    )

    config_cls, model_cls, extra = {
        "phi3": (Phi3Config, Phi3ForCausalLM, {}),
        "phi3-tied": (Phi3Config, Phi3ForCausalLM, {"tie_word_embeddings": True}),
        "olmo2": (Olmo2Config, Olmo2ForCausalLM, {"attention_bias": True}),
        "olmo3": (Olmo3Config, Olmo3ForCausalLM, {"sliding_window": 8, "tie_word_embeddings": True}),
    }[family]
    config = config_cls(
        **{
            "vocab_size": 512,
            "hidden_size": 128,
            "intermediate_size": 192,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "max_position_embeddings": 256,
            "tie_word_embeddings": False,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            **extra,
        }
    )
    torch.manual_seed(0)
    model = model_cls(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2 or name.endswith("bias"):
                param.normal_(0, 0.1)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                param.normal_(1, 0.2)
    shapes = prune(model, 0.5, "kv_group", out)
    assert len(set(shapes)) > 1
    return out


@pytest.mark.parametrize(
    ("family", "architecture"),
    [
        ("phi3", "PrunedPhi3ForCausalLM"),
        ("phi3-tied", "PrunedPhi3ForCausalLM"),
        ("olmo2", "PrunedOlmo2ForCausalLM"),
        ("olmo3", "PrunedOlmo3ForCausalLM"),
    ],
)
def test_pruned_phi3_and_olmo_give_transformers_greedy_tokens(family, architecture, tmp_path):
    model_dir = random_phi3_olmo_model(family, tmp_path / family)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == [architecture]
    if family.startswith("olmo"):  # per-layer q/k norm eps, rewritten at compaction
        assert len({json.dumps(e["norm_eps"]) for e in config["pruned_layers"]}) > 1
    prompts = torch.randint(0, 512, (3, 12), generator=torch.Generator().manual_seed(1)).tolist()
    assert_same_greedy(reference_greedy(model_dir, prompts), vllm_greedy(model_dir, prompts))
