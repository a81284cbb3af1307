"""Quantized frozen base: pruning-step memory (bf16 / int8 / nf4) and the quality it costs.

``memory``: one LoRAPrune step (forward, backward, ``lora`` importance update) on a
LLaMA-7B-width model (hidden 4096, MLP 11008, vocabulary 32000) with 1 and 2 decoder layers, each
base in a fresh subprocess. The CPU has no allocator statistics, so the peak is the process's
resident-set high-water mark (``VmHWM``), reset through ``/proc/self/clear_refs`` after the
model is built and one warm-up step has run, and read after the measured step: weights, LoRA
state, activations and every temporary of the step, plus the Python/PyTorch runtime. Big
allocations are made ``mmap``-backed (``MALLOC_MMAP_THRESHOLD_``) so that freed memory leaves the
resident set. The per-layer figure is peak(2 layers) − peak(1 layer); from it and the rest, the
estimates for LLaMA-7B/13B/65B/70B are extrapolations (see :func:`estimate`).

``quality``: the same 50% LoRAPrune run on the tiny-llama fixture through the CLI with a float
base (fp32, bf16) and a quantized one (int8, nf4), and the pruned models' WikiText-2 perplexity.

``importance``: the importance ops on LLaMA-7B's up and down projections (r = 8, 64) with the
base held packed (int8, nf4; :class:`loraprune.ops.QuantizedWeight`, dequantized in the kernels'
load stage) against the bf16 base (the peer: ratio ``vs_dense``) and against the path the packed
op replaced (bitsandbytes dequantizes a block of rows, the dense op scores it). On CUDA the
``lora`` op also runs both factor stagings of the CUDA kernel (``double``, ``single``); on the CPU
every provider is the PyTorch reference, so CPU rows time the reference, not a kernel.

    python -m benchmarks.quantized_base memory [--seq-len 256]
    python -m benchmarks.quantized_base quality [--steps 40]
    python -m benchmarks.quantized_base importance [--device cuda] [--tokens 2048] [--quick]
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import datetime as dt
import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.harness import (
    DEFAULT_RESULTS_DIR,
    REPO_ROOT,
    device_name,
    shared_dir,
    step_memory_bytes,
    time_calls,
)
from benchmarks.quality import WITHOUT

BASES = ("bf16", "int8", "nf4")
RESULT_PREFIX = "RESULT "
DEVICE = "2-core CPU dev machine"
# bytes per weight: int8 adds one fp32 scale per row; nf4 one fp32 scale per 64 elements
BYTES_PER_WEIGHT = {"bf16": 2.0, "int8": 1.0, "nf4": 0.5 + 4 / 64}
# (hidden, MLP, layers, KV heads of 128-wide heads, vocabulary) of the published models
MODELS = {
    "LLaMA-7B": (4096, 11008, 32, 32, 32000),
    "LLaMA-13B": (5120, 13824, 40, 40, 32000),
    "LLaMA-65B": (8192, 22016, 80, 64, 32000),
    "LLaMA-2-70B": (8192, 28672, 80, 8, 32000),
}
GIB = 2**30


def layer_weights(hidden: int, mlp: int, kv_heads: int) -> int:
    kv = kv_heads * 128
    return hidden * (2 * hidden + 2 * kv) + 3 * hidden * mlp


def memory_worker(base: str, layers: int, seq_len: int) -> dict:
    from benchmarks.models import llama7b_config, random_llama
    from loraprune import LoraPruneConfig, LoraPruner

    torch.manual_seed(0)
    model = random_llama(llama7b_config(layers), torch.device("cpu"), torch.bfloat16)
    quantize = None if base == "bf16" else base
    pruner = LoraPruner(
        model,
        LoraPruneConfig(
            ratio=0.5,
            criterion="lora",  # the step the README's figures measure (not the default criterion)
            quantize_base=quantize,
            lora_dropout=0.0,
            layers=tuple(range(layers)),
        ),
    )
    pruner.model.train()
    tokens = torch.randint(0, 32000, (1, seq_len), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        pruner.model(input_ids=tokens, labels=tokens).loss.backward()
        pruner.update_scores()
        pruner.model.zero_grad(set_to_none=True)

    step()  # warm-up: LoRA gradients, bitsandbytes state
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    resident, peak = step_memory_bytes(step, torch.device("cpu"))
    return {"resident_bytes": resident, "peak_bytes": peak}


def run_memory(args: argparse.Namespace) -> list[dict]:
    rows = []
    for base in BASES:
        for layers in (1, 2):
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "OMP_NUM_THREADS": "2"}
            command = [sys.executable, "-m", "benchmarks.quantized_base", "_worker", base, str(layers)]
            command += ["--seq-len", str(args.seq_len)]
            done = subprocess.run(
                command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800
            )
            line = next((x for x in done.stdout.splitlines() if x.startswith(RESULT_PREFIX)), None)
            if done.returncode or line is None:
                raise RuntimeError(f"{base}/{layers} layers failed:\n{done.stderr[-3000:]}")
            result = json.loads(line.removeprefix(RESULT_PREFIX))
            rows.append({"base": base, "layers": layers, "seq_len": args.seq_len, **result})
            print(f"{base} {layers} layer(s): peak {result['peak_bytes'] / GIB:.3f} GiB", flush=True)
    return rows


def estimate(rows: list[dict]) -> list[dict]:
    """Peak memory of a full model per base, extrapolated from the measured 1- and 2-layer peaks.

    per layer (measured) = weights (known bytes) + the rest (saved activations, LoRA factors,
    gradients and Adam state); the rest is scaled by the layer's widths (hidden + MLP) relative
    to LLaMA-7B, the weights by the layer's parameter count. The 1-layer peak minus one layer is
    the fixed part (embeddings and LM head in bf16, logits, step temporaries, runtime); its
    embedding/LM-head bytes are rescaled to the model's hidden size.
    """
    hidden7, mlp7, _, kv7, vocab = MODELS["LLaMA-7B"]
    out = []
    for base in BASES:
        peak = {r["layers"]: r["peak_bytes"] for r in rows if r["base"] == base}
        per_layer = peak[2] - peak[1]
        rest = per_layer - layer_weights(hidden7, mlp7, kv7) * BYTES_PER_WEIGHT[base]
        fixed = peak[1] - per_layer - 2 * vocab * hidden7 * 2
        for name, (hidden, mlp, layers, kv_heads, vocabulary) in MODELS.items():
            layer = layer_weights(hidden, mlp, kv_heads) * BYTES_PER_WEIGHT[base]
            layer += rest * (hidden + mlp) / (hidden7 + mlp7)
            total = fixed + 2 * vocabulary * hidden * 2 + layers * layer
            out.append({"model": name, "base": base, "estimated_peak_bytes": total})
    return out


def run_quality(args: argparse.Namespace) -> list[dict]:
    """The four CLI runs side by side (each one process), then their reports."""
    shared = shared_dir()
    bases = (("fp32", "float32", None), ("bf16", "bfloat16", None), ("int8", "float32", "int8"))
    bases += (("nf4", "float32", "nf4"),)
    with tempfile.TemporaryDirectory() as root:
        jobs = []
        for name, dtype, quantize in bases:
            out = Path(root) / name
            command = [
                sys.executable,
                "-m",
                "loraprune.cli",
                "prune",
                str(shared / "fixtures" / "tiny-llama"),
            ]
            command += [
                "--data",
                str(shared / "data" / "calib-wikitext103-train-part.txt"),
                "--out",
                str(out),
            ]
            command += [
                *WITHOUT,  # the study predates the refit and distillation defaults
                "--ratio",
                "0.5",
                "--steps",
                str(args.steps),
                "--prune-every",
                "4",
                "--seq-len",
                "128",
            ]
            command += ["--batch-size", "4", "--dtype", dtype, "--device", "cpu", "--quiet"]
            command += ["--eval-data", str(shared / "data" / "wikitext-2" / "test.txt")]
            command += ["--eval-seq-len", "128", "--eval-max-windows", str(args.eval_windows)]
            if quantize:
                command += ["--quantize-base", quantize]
            jobs.append((name, out, subprocess.Popen(command, cwd=REPO_ROOT)))
        rows = []
        for name, out, job in jobs:
            if job.wait(timeout=3600):
                raise RuntimeError(f"{name}: the CLI run failed")
            report = json.loads((out / "prune_report.json").read_text())
            rows.append(
                {
                    "base": name,
                    "steps": args.steps,
                    "batch": "4x128",
                    "eval_windows": args.eval_windows,
                    "perplexity": report["eval"][0]["perplexity"],
                    "final_loss": report["final_loss"],
                }
            )
            print(f"{name}: perplexity {rows[-1]['perplexity']:.2f}", flush=True)
    return rows


# (out, in) of LLaMA-7B's MLP projections: up/gate (4096 -> 11008) and down (11008 -> 4096)
IMPORTANCE_SHAPES = {"up": (11008, 4096), "down": (4096, 11008)}
# Elements the replaced path dequantized at a time (QuantizedLoraPruneLinear's row blocks)
ROW_BLOCK_ELEMENTS = 1 << 22


def _bitsandbytes_rows(layer: torch.nn.Module, rows: slice) -> torch.Tensor:
    """The replaced path's dequantization: bitsandbytes dequantizes rows ``rows`` (float32); 4-bit
    rows must start on a block (``in_features`` a multiple of the block size, as here)."""
    import bitsandbytes.functional as bnb_functional

    weight = layer.weight
    if type(layer).__name__ == "Linear8bitLt":
        return bnb_functional.int8_vectorwise_dequant(weight.data[rows], weight.SCB[rows]).float()
    state, size = weight.quant_state, layer.in_features
    first, last = rows.start * size, rows.stop * size
    block_state = bnb_functional.QuantState(
        absmax=state.absmax[first // state.blocksize : last // state.blocksize],
        shape=torch.Size([last - first]),
        code=state.code,
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        dtype=torch.float32,
    )
    packed = weight.data.view(-1)[first // 2 : last // 2].view(-1, 1)
    return bnb_functional.dequantize_4bit(packed, block_state).view(rows.stop - rows.start, size)


def _row_block_path(op, layer: torch.nn.Module, x, grad_y, a, b, ga, gb):
    """What QuantizedLoraPruneLinear did before the packed op: dense op per dequantized row block."""
    from loraprune import ops

    out_features, in_features = layer.out_features, layer.in_features
    rows = torch.empty(out_features, dtype=torch.float32, device=a.device)
    cols = torch.zeros(in_features, dtype=torch.float32, device=a.device)
    step = max(1, ROW_BLOCK_ELEMENTS // in_features)
    for start in range(0, out_features, step):
        block = slice(start, min(start + step, out_features))
        weight = _bitsandbytes_rows(layer, block)
        if op == "lora":
            block_sums = ops.lora_importance(weight, a, b[block], ga, gb[block], 2.0)
        else:
            block_sums = ops.taylor_importance(x, grad_y[:, block], weight, a, b[block], 2.0)
        rows[block] = block_sums[0]
        cols += block_sums[1]
    return rows, cols


def _importance_cases(dense, layers, packed, x, grad_y, factors) -> dict:
    """(op, base, provider) -> the call to time, for one shape and rank."""
    from loraprune import ops

    a, b, ga, gb = factors
    lora = functools.partial(ops.lora_importance, lora_a=a, lora_b=b, grad_a=ga, grad_b=gb, scaling=2.0)
    taylor = functools.partial(ops.taylor_importance, x, grad_y, lora_a=a, lora_b=b, scaling=2.0)
    cases = {
        ("lora", "bf16", "dense"): functools.partial(lora, dense),
        ("taylor", "bf16", "dense"): functools.partial(taylor, dense),
    }
    for kind, weight in packed.items():
        cases[("lora", kind, "packed")] = functools.partial(lora, weight)
        cases[("lora", kind, "row_blocks")] = functools.partial(
            _row_block_path, "lora", layers[kind], x, grad_y, *factors
        )
        cases[("taylor", kind, "packed")] = functools.partial(taylor, weight)
        cases[("taylor", kind, "row_blocks")] = functools.partial(
            _row_block_path, "taylor", layers[kind], x, grad_y, *factors
        )
    device = x.device
    if device.type == "cuda" and ops.backend_unavailable_reason("cuda", device) is None:
        from loraprune.ops import cuda as cuda_ops

        for staging in cuda_ops.FACTOR_STAGINGS:
            for base, weight in (("bf16", dense), *packed.items()):
                cases[("lora", base, f"cuda_{staging}")] = functools.partial(
                    cuda_ops.lora_importance, weight, *factors, 2.0, staging=staging
                )
    return cases


def run_importance(args: argparse.Namespace) -> list[dict]:
    from loraprune import ops
    from loraprune.quantization import quantize_linear

    device = torch.device(args.device)
    ranks = (8,) if args.quick else (8, 64)
    shapes = dict(list(IMPORTANCE_SHAPES.items())[:1]) if args.quick else IMPORTANCE_SHAPES
    generator = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0, dtype=torch.float32):
        return (torch.randn(shape, generator=generator) * scale).to(device, dtype)

    rows = []
    for shape_name, (out_features, in_features) in shapes.items():
        dense = randn(out_features, in_features, scale=0.02, dtype=torch.bfloat16)
        layers = {kind: quantize_linear(dense, kind) for kind in ("int8", "nf4")}
        packed = {kind: ops.QuantizedWeight.from_bitsandbytes(layer) for kind, layer in layers.items()}
        x = randn(args.tokens, in_features, dtype=torch.bfloat16)
        grad_y = randn(args.tokens, out_features, scale=1e-3, dtype=torch.bfloat16)
        for rank in ranks:
            factors = (
                randn(rank, in_features, scale=0.01),
                randn(out_features, rank, scale=0.01),
                randn(rank, in_features, scale=0.01),
                randn(out_features, rank, scale=0.01),
            )
            seconds = {}
            for key, call in _importance_cases(dense, layers, packed, x, grad_y, factors).items():
                samples = time_calls(call, device, repetitions=args.repetitions, warmup=1)
                seconds[key] = sorted(samples)[len(samples) // 2]
            for (op, base, provider), median in seconds.items():
                rows.append(
                    {
                        "device": device_name(device),
                        "op": op,
                        "shape": shape_name,
                        "out": out_features,
                        "in": in_features,
                        "rank": rank,
                        "tokens": args.tokens if op == "taylor" else "",
                        "base": base,
                        "provider": provider,
                        "backend": "torch" if device.type == "cpu" else "auto",
                        "median_ms": median * 1e3,
                        "vs_dense": median / seconds[(op, "bf16", "dense")],
                    }
                )
                print(f"{op} {shape_name} r={rank} {base} {provider}: {median * 1e3:.2f} ms", flush=True)
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    rows = [{"date": date, "device": DEVICE, "torch": torch.__version__, **r} for r in rows]
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", choices=["memory", "quality", "importance", "_worker"])
    parser.add_argument("base", nargs="?")
    parser.add_argument("layers", nargs="?", type=int)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=2048, help="importance: tokens of X and dY (taylor)")
    parser.add_argument("--repetitions", type=int, default=10, help="importance: timed calls per case")
    parser.add_argument("--quick", action="store_true", help="importance: the up projection at r = 8 only")
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.study == "_worker":
        print(RESULT_PREFIX + json.dumps(memory_worker(args.base, args.layers, args.seq_len)))
        return 0
    args.results_dir.mkdir(parents=True, exist_ok=True)
    if args.study == "memory":
        rows = run_memory(args)
        reference = {r["layers"]: r["peak_bytes"] for r in rows if r["base"] == "bf16"}
        for row in rows:
            row["ratio_to_bf16"] = row["peak_bytes"] / reference[row["layers"]]
        write_csv(args.results_dir / "quantized_base_memory.csv", rows)
        estimates = estimate(rows)
        write_csv(args.results_dir / "quantized_base_estimates.csv", estimates)
        for row in estimates:
            print(f"{row['model']} {row['base']}: {row['estimated_peak_bytes'] / GIB:.1f} GiB (extrapolated)")
    elif args.study == "importance":
        rows = run_importance(args)
        write_csv(args.results_dir / "quantized_base_importance.csv", rows)
    else:
        rows = run_quality(args)
        write_csv(args.results_dir / "quantized_base_quality.csv", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
