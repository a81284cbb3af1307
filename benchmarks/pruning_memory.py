"""Study 2: peak memory and time of one pruning step on a LLaMA-7B-shaped model.

One step is forward + backward + importance update (no optimizer step: it is the same for
every method), on random token batches, for each provider in a fresh subprocess so that the
peak-memory accounting starts clean:

- ``peft-lora``: plain PEFT LoRA fine-tuning (``get_peft_model``), forward + backward: the reference.
- ``loraprune``: LoRAPrune (``criterion="lora"``) with loraprune's default dispatch (fused
  kernels where available).
- ``loraprune-reference``: the same with ``LORAPRUNE_BACKEND=torch`` (the PyTorch reference ops;
  on the CPU the same as ``loraprune``, so left out there).
- ``taylor``: the first-order Taylor criterion of LLM-Pruner computed fused (``taylor_impl="fused"``,
  the default): from each layer's input and output gradient during the backward, no weight gradient.
- ``taylor-materialized``: the same criterion from the frozen weights' real gradients.
- ``act``: structure-level first-order Taylor from the o_proj / down_proj inputs.
- ``taylor-distill``: ``taylor`` with distillation from the unpruned model (``distill_weight`` 0.5,
  :mod:`loraprune.distill`): the teacher's no-grad forward (masks and LoRA off) and the chunked KL
  added to the step.

All use LoRA r=8, alpha 16, dropout 0.05 on the seven projections, masks all kept (the first
step of iterative pruning). Peak memory over one step, weights included, is measured

- on CUDA: ``torch.cuda.max_memory_allocated`` (peak reset before the step); its floor is
  ``torch.cuda.memory_allocated`` before the step (weights, adapters, masks);
- on the CPU: the process's peak resident set size, ``VmHWM`` of ``/proc/self/status``, reset by
  writing ``5`` to ``/proc/self/clear_refs`` just before the step (Linux); its floor is ``VmRSS``
  before the step. It counts the whole process (interpreter and libraries included), so compare
  providers by their peak minus floor, the step's own memory.

The step-time floor is the step's matrix FLOPs at the calibrated matmul rate (CUDA only; on the
CPU one step is timed without warm-up and without a floor).

    python -m benchmarks.pruning_memory [--quick] [--layers N] [--batches 1,4] [--providers ...]
    python -m benchmarks.pruning_memory --device cpu --layers 2 --batches 1 --seq-len 128 --dtype fp32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.harness import (
    DEFAULT_RESULTS_DIR,
    GIB,
    REPO_ROOT,
    Recorder,
    Result,
    dtype_name,
    results_table,
    step_memory_bytes,
    time_calls,
)
from benchmarks.models import (
    attention_flops,
    attention_widths,
    causal_context,
    llama7b_config,
    projection_parameters,
    random_llama,
)
from loraprune import LoraPruneConfig, LoraPruner
from loraprune.config import ALL_PROJECTIONS
from loraprune.distill import Distiller

PROVIDERS = (
    "peft-lora",
    "loraprune",
    "loraprune-reference",
    "taylor",
    "taylor-materialized",
    "act",
    "taylor-distill",
)
CRITERIA = {"loraprune": "lora", "loraprune-reference": "lora", "taylor": "taylor"}
CRITERIA.update({"taylor-materialized": "taylor", "act": "act", "taylor-distill": "taylor"})
DISTILL_WEIGHT = 0.5
REFERENCE = "peft-lora"
LORA_R, LORA_ALPHA, LORA_DROPOUT = 8, 16.0, 0.05
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
RESULT_PREFIX = "RESULT "


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.pruning_memory", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="4 layers, batch 1 only, 3 timed steps")
    parser.add_argument("--layers", type=int, help="decoder layers (default 32, quick 4)")
    parser.add_argument(
        "--batches", help="comma-separated batch sizes of 512-token sequences (default 1,4; quick 1)"
    )
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, help="timed steps per provider (default 5, quick 3)")
    parser.add_argument(
        "--providers", default=",".join(PROVIDERS), help=f"comma-separated subset of {PROVIDERS}"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR)
    parser.add_argument(
        "--timeout", type=int, default=600, help="seconds allowed to one provider's subprocess"
    )
    # internal: one measurement, in the subprocess that main() starts per provider and batch
    parser.add_argument("--worker", choices=PROVIDERS, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    if args.worker:
        measure_step(args, device)
        return 0
    layers = args.layers or (4 if args.quick else 32)
    batches = [int(b) for b in (args.batches or ("1" if args.quick else "1,4")).split(",")]
    steps = args.steps or (3 if args.quick else 5)
    providers = args.providers.split(",")
    unknown = set(providers) - set(PROVIDERS)
    if unknown:
        raise SystemExit(f"--providers: unknown {sorted(unknown)}; choose from {PROVIDERS}")
    if device.type == "cpu":
        providers = [p for p in providers if p != "loraprune-reference"]  # the CPU always takes torch
    dtype = DTYPES[args.dtype]
    recorder = Recorder(args.results_dir, "pruning", device)
    if device.type == "cuda":
        recorder.calibrate([dtype])
        torch.cuda.empty_cache()
    for batch in batches:
        for provider in sorted(providers, key=lambda p: p != REFERENCE):  # the reference first
            command = [
                *("-m", "benchmarks.pruning_memory", "--worker", provider, "--batch", str(batch)),
                *("--layers", str(layers), "--seq-len", str(args.seq_len), "--steps", str(steps)),
                *("--dtype", args.dtype, "--device", device.type),
            ]
            outcome = run_worker(command, provider, args.timeout)
            record_step(recorder, outcome, provider, layers, batch, args.seq_len, dtype)
    print(results_table([r for r in recorder.rows if not r["benchmark"].startswith("calibration")]))
    return 0


def run_worker(arguments: list[str], provider: str, timeout: int) -> dict:
    """Run one measurement in a fresh interpreter; returns its result or ``{"error": ...}``."""
    env = dict(os.environ)
    if provider == "loraprune-reference":
        env["LORAPRUNE_BACKEND"] = "torch"
    else:
        env.pop("LORAPRUNE_BACKEND", None)
    try:
        done = subprocess.run(
            [sys.executable, *arguments],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {timeout} s"}
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line.removeprefix(RESULT_PREFIX))
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {done.returncode}: {' | '.join(tail)}"[:400]}


def record_step(
    recorder: Recorder,
    outcome: dict,
    provider: str,
    layers: int,
    batch: int,
    seq_len: int,
    dtype: torch.dtype,
) -> None:
    base = {
        "provider": provider,
        "shape": f"llama-7b layers={layers} tokens={batch}x{seq_len} r={LORA_R}",
        "dtype": f"{dtype_name(dtype)} (LoRA float32)",
        "reference": REFERENCE,
    }
    if "error" in outcome:
        for benchmark in ("pruning_step_peak_memory", "pruning_step_time"):
            recorder.record(Result(benchmark, **base, status="error", note=outcome["error"]))
        return
    recorder.record(
        Result(
            "pruning_step_peak_memory",
            **base,
            value=outcome["peak_bytes"] / GIB,
            unit="GiB",
            floor=outcome["resident_bytes"] / GIB,
            floor_basis="resident model",
            repetitions=1,
            note=f"weights {outcome['weight_bytes'] / GIB:.2f} GiB; step's own "
            f"{(outcome['peak_bytes'] - outcome['resident_bytes']) / GIB:.2f} GiB; {outcome['memory_kind']}",
        )
    )
    if recorder.calibration is None:  # the CPU: one untimed-warm-up step, no floor
        recorder.record(
            Result(
                "pruning_step_time",
                **base,
                value=statistics.median(outcome["step_seconds"]) * 1e3,
                unit="ms",
                repetitions=len(outcome["step_seconds"]),
                note="one step, no warm-up",
            )
        )
        return
    floor, basis = recorder.floor(outcome["weight_bytes"], outcome["flops"], dtype)
    recorder.record(
        Result(
            "pruning_step_time",
            **base,
            value=statistics.median(outcome["step_seconds"]) * 1e3,
            unit="ms",
            floor=floor,
            floor_basis=basis,
            repetitions=len(outcome["step_seconds"]),
        )
    )


def measure_step(args: argparse.Namespace, device: torch.device) -> None:
    """The worker: build the model, set up one provider, measure one step; print one JSON line."""
    model = random_llama(llama7b_config(args.layers), device, DTYPES[args.dtype])
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # forward and activation-gradient products (the weights are frozen); taylor adds dYᵀX
    products = 3 if args.worker.startswith("taylor") else 2
    tokens = args.batch * args.seq_len
    flops = products * 2 * (projection_parameters(model) + model.lm_head.weight.numel()) * tokens
    flops += 3 * attention_flops(
        attention_widths(model), args.batch, args.seq_len, causal_context(args.seq_len)
    )
    if args.worker == "taylor-distill":  # the teacher's forward (the student's is counted above)
        flops += 2 * (projection_parameters(model) + model.lm_head.weight.numel()) * tokens
    model, update = prepare(model, args.worker)
    model.train()
    generator = torch.Generator(device).manual_seed(0)
    input_ids = torch.randint(
        0, model.config.vocab_size, (args.batch, args.seq_len), device=device, generator=generator
    )
    loss = loss_function(model, args.worker)

    def step() -> None:
        loss(input_ids).backward()
        update()
        model.zero_grad(set_to_none=True)

    if device.type == "cuda":
        step_seconds = time_calls(step, device, repetitions=args.steps, warmup=2)
        resident, peak = step_memory_bytes(step, device)
        kind = "cuda max_memory_allocated"
    else:
        step_seconds = []

        def timed_step() -> None:
            started = time.perf_counter()
            step()
            step_seconds.append(time.perf_counter() - started)

        resident, peak = step_memory_bytes(timed_step, device)
        kind = "cpu peak RSS (VmHWM after clear_refs)"
    result = {
        "weight_bytes": weight_bytes,
        "resident_bytes": resident,
        "peak_bytes": peak,
        "memory_kind": kind,
        "step_seconds": step_seconds,
        "flops": flops,
    }
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def loss_function(model: torch.nn.Module, provider: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The step's loss: the cross-entropy, or with ``taylor-distill`` the distillation loss."""
    if provider == "taylor-distill":
        distiller = Distiller(model, DISTILL_WEIGHT, 1.0)
        return lambda input_ids: distiller.loss(model, input_ids)[0]
    return lambda input_ids: model(input_ids=input_ids, labels=input_ids).loss


def prepare(model: torch.nn.Module, provider: str) -> tuple[torch.nn.Module, Callable[[], None]]:
    """The model as ``provider`` trains it, and its per-step importance update (a no-op for PEFT)."""
    if provider == "peft-lora":
        from peft import LoraConfig, get_peft_model  # an optional dependency: imported where needed

        peft_config = LoraConfig(
            r=LORA_R,
            lora_alpha=LORA_ALPHA,
            lora_dropout=LORA_DROPOUT,
            target_modules=list(ALL_PROJECTIONS),
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, peft_config), lambda: None
    config = LoraPruneConfig(
        ratio=0.5,
        # Every layer of the few-layer proxy is scored, as 28 of LLaMA-7B's 32 are by default: with the
        # default skip rule a 2-layer proxy would score layer 0 only and measure mostly frozen weights.
        layers=tuple(range(model.config.num_hidden_layers)),
        criterion=CRITERIA[provider],
        taylor_impl="materialized" if provider == "taylor-materialized" else None,
        lora_r=LORA_R,
        lora_alpha=LORA_ALPHA,
        lora_dropout=LORA_DROPOUT,
    )
    pruner = LoraPruner(model, config)
    return pruner.model, pruner.update_scores


if __name__ == "__main__":
    raise SystemExit(main())
