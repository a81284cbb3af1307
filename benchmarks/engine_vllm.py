"""vLLM offline throughput of a dense model and its pruned (compacted) copies, served through the
loraprune plugin: generated tokens per second on a fixed prompt set, in one run.

Models: a LLaMA of ``--shape`` (``small``: 8 layers of width 1024, 16 heads of 64, MLP 2816, vocab
8192, the CPU default; ``llama7b``: LLaMA-7B's shapes with ``--layers`` layers) with random
weights, and copies pruned at each of ``--ratios`` by weight magnitude without training
(:func:`benchmarks.models.prune_without_training`, LoRAPrune's layer choice and global ranking, so
layers differ, MLP widths rounded to ``--round-to``): throughput depends on the shapes only. Every
engine serves the same ``--prompts`` prompts of ``--prompt-len`` random token ids and generates
``--new-tokens`` greedy tokens for each (EOS ignored); one warm-up round, then the median of
``--repeats`` timed rounds. Engines run one after another, each in vLLM's default setup (engine core
in its own process). ``ratio_to_reference`` = pruned / dense (above 1: faster, or more KV cache);
``weight bytes`` rows give each model's parameter bytes over dense's. ``--models NAME=MODEL,...``
serves real models instead, named as the CLI names them (a folder, a Hub id or a .gguf file); the
first is the reference, named ``dense``. Needs vLLM (on the CPU: the environment of
.ci/engine_vllm.sh):

    python -m benchmarks.engine_vllm [--shape small|llama7b] [--layers N] [--ratios 0.2,0.5]
    python -m benchmarks.engine_vllm --models dense=model.gguf,pruned50=runs/p50 --new-tokens 128
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import DEFAULT_RESULTS_DIR, Recorder, Result, dtype_name, results_table
from benchmarks.models import (
    llama7b_config,
    parameter_bytes,
    prune_without_training,
    random_llama,
    real_models,
)

STUDY = "engine_vllm"
SMALL = {
    "vocab_size": 8192,
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.engine_vllm", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--shape", choices=["small", "llama7b"], default="small")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the shape's)")
    parser.add_argument("--ratios", default="0.2,0.5", help="comma-separated pruning ratios")
    parser.add_argument(
        "--models",
        help="NAME=MODEL,... real models to serve instead of the random ones (the first is the reference)",
    )
    parser.add_argument(
        "--label", help="the rows' shape label with --models (default: the first model's name)"
    )
    parser.add_argument("--round-to", type=int, default=64, help="MLP widths kept at multiples of this")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="default: fp32 CPU, bf16 GPU"
    )
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR)
    return parser


def model_config(args: argparse.Namespace):
    from transformers import LlamaConfig

    if args.shape == "llama7b":
        return llama7b_config(args.layers or 32)
    return LlamaConfig(**{**SMALL, "num_hidden_layers": args.layers or SMALL["num_hidden_layers"]})


@torch.no_grad()
def write_models(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype, root: Path
) -> dict[str, Path]:
    """The dense checkpoint and one pruned checkpoint per ratio (the same random weights)."""
    config = model_config(args)
    paths = {}
    for ratio in [0.0, *(float(r) for r in args.ratios.split(","))]:
        name = "dense" if ratio == 0 else f"pruned{round(100 * ratio)}"
        model = random_llama(config, device, dtype)
        if ratio:
            model = prune_without_training(model, ratio, uniform=False, round_to=args.round_to)
        paths[name] = root / name
        model.save_pretrained(paths[name])
        del model
        gc.collect()
    return paths


def serve(
    path: Path, args: argparse.Namespace, dtype: torch.dtype, on_gpu: bool
) -> tuple[list[float], int | None]:
    """Throughput (tokens/s) of each timed round, and the engine's KV-cache capacity in tokens."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=str(path),
        dtype=dtype_name(dtype),
        skip_tokenizer_init=True,
        max_model_len=args.prompt_len + args.new_tokens,
        enforce_eager=not on_gpu,  # CUDA graphs on the GPU; no compile step on the CPU
        seed=0,
    )
    ids = torch.randint(0, 8192, (args.prompts, args.prompt_len), generator=torch.Generator().manual_seed(0))
    prompts = [TokensPrompt(prompt_token_ids=row) for row in ids.tolist()]  # ids in both shapes' vocabularies
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True, detokenize=False)
    llm.generate(prompts, params, use_tqdm=False)  # warm-up
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        rates.append(sum(len(o.outputs[0].token_ids) for o in outputs) / seconds)
    cache = llm.llm_engine.vllm_config.cache_config
    capacity = cache.num_gpu_blocks * cache.block_size if cache.num_gpu_blocks else None
    del llm
    gc.collect()
    return rates, capacity


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if importlib.util.find_spec("vllm") is None:
        print(
            "SKIPPED the vLLM throughput study: vLLM is not installed (CPU: bash .ci/engine_vllm.sh --build)"
        )
        return 0
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if on_gpu else torch.float32)
    recorder = Recorder(args.results_dir, STUDY, device)
    import vllm

    note = f"vllm {vllm.__version__}"
    with tempfile.TemporaryDirectory(prefix="loraprune-vllm-bench-") as root, contextlib.ExitStack() as stack:
        if args.models:
            folders = real_models(args.models, stack)
            label = args.label or args.models.split(",")[0].split("=")[0]
        else:
            folders = write_models(args, device, dtype, Path(root))
            label = f"{args.shape} L={args.layers or model_config(args).num_hidden_layers}"
        shape = f"{label} prompts={args.prompts} in={args.prompt_len} out={args.new_tokens}"
        for name, path in folders.items():
            if on_gpu:
                torch.cuda.empty_cache()
            rates, capacity = serve(path, args, dtype, on_gpu)
            reference = "" if name == "dense" else "dense"
            recorder.record(
                Result(
                    "vllm_offline_throughput",
                    name,
                    shape,
                    dtype_name(dtype),
                    value=statistics.median(rates),
                    unit="tok/s",
                    reference=reference,
                    repetitions=len(rates),
                    note=f"{note}; rounds {', '.join(f'{r:.1f}' for r in rates)}; load average {os.getloadavg()[0]:.1f}",
                )
            )
            recorder.record(
                Result(
                    "vllm weight bytes",
                    name,
                    shape,
                    dtype_name(dtype),
                    value=parameter_bytes(path, dtype_name(dtype)),
                    unit="B",
                    reference=reference,
                    note="parameters, tied matrices once",
                )
            )
            if capacity:
                recorder.record(
                    Result(
                        "vllm_kv_cache_capacity",
                        name,
                        shape,
                        dtype_name(dtype),
                        value=capacity,
                        unit="tokens",
                        reference=reference,
                        note=f"{note}; VLLM_CPU_KVCACHE_SPACE={os.environ['VLLM_CPU_KVCACHE_SPACE']} GiB"
                        if not on_gpu
                        else note,
                    )
                )
    print(results_table(recorder.rows))
    return 0


if __name__ == "__main__":  # the guard matters: vLLM's engine core is a spawned process
    raise SystemExit(main())
