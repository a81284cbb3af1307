"""PrunedLoRA study: LoRA-guided pruning at rank 8, at rank 64, and 64 → 8 with rank pruning.

Every configuration prunes a tiny fixture through the ``loraprune`` command line (one subprocess
each, so each has its own peak memory) with ``--criterion lora`` and the quality study's budget;
only the LoRA rank and the rank schedule change:

- ``r8``: ``--lora-r 8`` throughout; ``r64``: ``--lora-r 64`` throughout;
- ``r64-to-8``: ``--lora-r 64 --lora-final-r 8`` (PrunedLoRA, default schedule and
  ``--lora-alpha-mode rank``, so it starts as ``r64`` with the same scaling ``16/64``);
  ``r64-to-8-fixed``: the same with ``--lora-alpha-mode fixed`` (the scaling grows to ``16/8``).

Rows (``benchmarks/results/prunedlora.csv``; ``shape`` names fixture, pair, budget and seed):
perplexity on each evaluation set of the pair, the pruning process's peak resident memory
(``VmHWM`` on the CPU, ``max_memory_allocated`` on CUDA: ``peak_memory_bytes`` of
``prune_report.json``), for ``r64-to-8`` also the peak from the last rank removal on, and the mean
step time (the run's wall time over its steps). Finished rows are not run again (the study
resumes); ``prunedlora.md`` is rebuilt from the CSV (mean ± sample std over the seeds present).

    python -m benchmarks.prunedlora --steps 20 --batch-size 2 --seq-len 128 --prune-every 2 \\
        --eval-seq-len 128 --max-windows 32 --ratios 0.5,0.2 --seeds 0,1,2

On the tiny fixtures the LoRA state is a few percent of the process, so ``--memory`` also measures
what the rank itself costs, on a LLaMA-7B-width model of ``--memory-layers`` decoder layers (fp32, CPU
or CUDA, each case in a fresh process): one training step (forward, backward, ``lora`` importance,
rank scores, AdamW step) at rank 8, at rank 64, and at rank 8 after pruning from 64 (one step at 64
creates the AdamW state, then ``prune_rank`` narrows it). Rows (``prunedlora_memory.csv``): the LoRA
state (factors and AdamW moments; the gradients exist during the step only), the resident memory
before the step and the step's peak (``VmHWM`` after ``clear_refs`` on the CPU,
``max_memory_allocated`` on CUDA).

    python -m benchmarks.prunedlora --memory [--memory-layers 2] [--memory-seq-len 256]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.harness import (
    DEFAULT_RESULTS_DIR,
    GIB,
    REPO_ROOT,
    Recorder,
    Result,
    read_rows,
    shared_dir,
    step_memory_bytes,
)
from benchmarks.quality import (
    CHECKPOINT_NAME,
    FIXTURES,
    PAIRS,
    REPORT_NAME,
    SEED_PATTERN,
    WITHOUT,
    Budget,
    QualityRun,
)

METHODS = {  # name: extra CLI flags (all --criterion lora)
    "r8": ("--lora-r", "8"),
    "r64": ("--lora-r", "64"),
    "r64-to-8": ("--lora-r", "64", "--lora-final-r", "8"),
    "r64-to-8-fixed": ("--lora-r", "64", "--lora-final-r", "8", "--lora-alpha-mode", "fixed"),
}
MEMORY_CASES = {"r8": (8, None), "r64": (64, None), "r64-to-8": (64, 8)}  # name: (lora_r, lora_final_r)
RESULT_PREFIX = "RESULT "
MEMORY = "peak memory"
MEMORY_AFTER_RANK = "peak memory after the last rank removal"
STEP_TIME = "step time"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.prunedlora", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--ratios", default="0.5,0.2")
    parser.add_argument(
        "--methods", default="r8,r64,r64-to-8", help=f"comma-separated subset of {list(METHODS)}"
    )
    parser.add_argument("--fixtures", default=",".join(FIXTURES))
    parser.add_argument("--pairs", default=",".join(PAIRS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--prune-every", type=int, default=2)
    parser.add_argument("--eval-seq-len", type=int, default=128)
    parser.add_argument("--max-windows", type=int, default=32)
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of each CLI subprocess")
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR)
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / "benchmarks" / ".work" / "prunedlora")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds allowed to one CLI command")
    parser.add_argument("--report-only", action="store_true", help="rebuild prunedlora.md from the CSV")
    parser.add_argument("--memory", action="store_true", help="measure one step's memory per rank instead")
    parser.add_argument("--memory-layers", type=int, default=2)
    parser.add_argument("--memory-seq-len", type=int, default=256)
    parser.add_argument("--memory-worker", choices=list(MEMORY_CASES), help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.memory_worker:
        print(RESULT_PREFIX + json.dumps(memory_worker(args)), flush=True)
        return 0
    if args.memory:
        return measure_memory(args)
    csv_path = args.results_dir / "prunedlora.csv"
    if not args.report_only:
        missing = [
            str(p)
            for p in (shared_dir().joinpath(*FIXTURES[f]) for f in args.fixtures.split(","))
            if not p.exists()
        ]
        if missing:
            print(f"SKIPPED the PrunedLoRA study: {', '.join(missing)} not found (set LORAPRUNE_SHARED).")
            return 0
        run_study(args, csv_path)
    write_report(csv_path, args.results_dir / "prunedlora.md")
    print((args.results_dir / "prunedlora.md").read_text())
    return 0


def run_study(args: argparse.Namespace, csv_path: Path) -> None:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    args.jobs = 1
    study = QualityRun(
        Recorder(args.results_dir, "prunedlora", device),
        dtype,
        device,
        [(args.eval_seq_len, args.max_windows)],
        args,
    )
    done = {(r["provider"], r["shape"]) for r in read_rows(csv_path) if r["status"] == "ok"}
    # Priority: every configuration of seed 0 first, so that an unfinished study has whole seeds.
    for seed in (int(s) for s in args.seeds.split(",")):
        for ratio in (float(r) for r in args.ratios.split(",")):
            for fixture in args.fixtures.split(","):
                for pair in args.pairs.split(","):
                    budget = Budget(
                        fixture,
                        pair,
                        args.steps,
                        args.batch_size,
                        args.seq_len,
                        args.lr,
                        args.prune_every,
                        seed,
                    )
                    for method in args.methods.split(","):
                        provider = f"{method} {ratio:.0%}"
                        if (provider, str(budget)) not in done:
                            run_one(study, budget, method, ratio, provider)


def run_one(study: QualityRun, budget: Budget, method: str, ratio: float, provider: str) -> None:
    calibration, evals = PAIRS[budget.pair]
    eval_seq_len, max_windows = study.protocols[0]
    shared = shared_dir()
    out = study.args.work_dir / f"{method}-{ratio:g}-{str(budget).replace(' ', '-')}-{study.dtype}"
    command = [
        *("prune", str(shared.joinpath(*FIXTURES[budget.fixture]))),
        *("--data", str(shared.joinpath(*calibration)), "--out", str(out), "--criterion", "lora"),
        *("--ratio", str(ratio), *WITHOUT, *METHODS[method], "--steps", str(budget.steps)),
        *("--batch-size", str(budget.batch_size), "--seq-len", str(budget.seq_len), "--lr", str(budget.lr)),
        *("--seed", str(budget.seed), "--prune-every", str(budget.prune_every)),
        *(arg for parts in evals.values() for arg in ("--eval-data", str(shared.joinpath(*parts)))),
        *("--eval-seq-len", str(eval_seq_len), "--eval-max-windows", str(max_windows)),
        "--resume" if (out / CHECKPOINT_NAME).exists() else "--overwrite",
    ]
    if not (out / REPORT_NAME).exists():
        failure = study.cli(command)
        if failure:
            record(study, budget, provider, "run", None, "", note=failure, status="error")
            return
    report = json.loads((out / REPORT_NAME).read_text())
    note = f"final loss {report['final_loss']:.3f}; {report['wall_time_s']:.1f} s for {report['steps']} steps"
    if "lora_rank" in report:
        schedule = report["lora_rank"]["schedule"]
        note += f"; rank removed every {schedule['every']} steps, {schedule['count']} at a time, at {schedule['steps']}"
    for name, result in zip(evals, report["eval"], strict=True):
        record(
            study,
            budget,
            provider,
            f"perplexity {name} seq={eval_seq_len}",
            result["perplexity"],
            "ppl",
            note,
        )
    record(
        study, budget, provider, MEMORY, report["peak_memory_bytes"] / GIB, "GiB", report["peak_memory_kind"]
    )
    after = report.get("lora_rank", {}).get("peak_memory_after_rank_bytes")
    if after is not None:
        record(study, budget, provider, MEMORY_AFTER_RANK, after / GIB, "GiB", report["peak_memory_kind"])
    record(
        study, budget, provider, STEP_TIME, report["wall_time_s"] / report["steps"], "s", "wall time / steps"
    )


def measure_memory(args: argparse.Namespace) -> int:
    """Each case of :data:`MEMORY_CASES` in a fresh process; rows to ``prunedlora_memory.csv``."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    recorder = Recorder(args.results_dir, "prunedlora_memory", device)
    shape = f"LLaMA-7B width, {args.memory_layers} layers, 1x{args.memory_seq_len} tokens"
    for case in MEMORY_CASES:
        command = [sys.executable, "-m", "benchmarks.prunedlora", "--memory-worker", case]
        command += ["--memory-layers", str(args.memory_layers), "--memory-seq-len", str(args.memory_seq_len)]
        command += ["--device", device.type]
        done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=args.timeout)
        lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
        if not lines:
            tail = " | ".join(done.stderr.strip().splitlines()[-3:])
            recorder.record(Result("step", case, shape, "float32", status="error", note=tail[:400]))
            continue
        result = json.loads(lines[-1].removeprefix(RESULT_PREFIX))
        note = f"{result['memory_kind']}; rank {result['rank']}"
        for benchmark, key, unit, scale in [
            ("LoRA state (factors + AdamW moments)", "lora_state_bytes", "MiB", 2**20),
            ("resident before the step", "resident_bytes", "GiB", GIB),
            ("peak of the step", "peak_bytes", "GiB", GIB),
            ("step memory (peak - resident)", "step_bytes", "GiB", GIB),
        ]:
            value = result[key] / scale
            recorder.record(
                Result(benchmark, case, shape, "float32", value=value, unit=unit, reference="r8", note=note)
            )
            print(f"{case:10s} {benchmark:40s} {value:10.3f} {unit}")
    return 0


def memory_worker(args: argparse.Namespace) -> dict:
    """One case: build, one step at the starting rank, prune the rank if the case does, measure a step."""
    from benchmarks.models import llama7b_config, random_llama
    from loraprune import LoraPruneConfig, LoraPruner

    device = torch.device(args.device or "cpu")
    lora_r, final_r = MEMORY_CASES[args.memory_worker]
    model = random_llama(llama7b_config(args.memory_layers), device, torch.float32)
    config = LoraPruneConfig(
        ratio=0.5,
        layers=tuple(range(args.memory_layers)),
        criterion="lora",
        lora_r=lora_r,
        lora_final_r=final_r,
    )
    pruner = LoraPruner(model, config)
    optimizer = torch.optim.AdamW(pruner.trainable_parameters(), lr=1e-4)
    tokens = torch.randint(0, model.config.vocab_size, (1, args.memory_seq_len), device=device)
    pruner.model.train()

    def step() -> None:
        pruner.model(input_ids=tokens, labels=tokens).loss.backward()
        pruner.update_scores()
        if pruner.rank is not None:
            pruner.update_rank_scores()
        optimizer.step()
        pruner.model.zero_grad(set_to_none=True)

    step()  # the AdamW state exists from here on
    if pruner.rank is not None:
        pruner.prune_rank(None, optimizer)
    gc.collect()
    params = pruner.trainable_parameters()
    lora_state = sum(p.nbytes for p in params) + sum(
        t.nbytes for p in params for t in optimizer.state[p].values() if torch.is_tensor(t) and t.ndim
    )
    resident, peak = step_memory_bytes(step, device)
    kind = "cuda max_memory_allocated" if device.type == "cuda" else "cpu VmHWM after clear_refs"
    rank = sorted({p.shape[0] for p in params[::2]})
    return {
        "lora_state_bytes": lora_state,
        "resident_bytes": resident,
        "peak_bytes": peak,
        "step_bytes": peak - resident,
        "memory_kind": kind,
        "rank": rank,
    }


def record(
    study: QualityRun, budget: Budget, provider: str, benchmark: str, value, unit: str, note: str, status="ok"
) -> None:
    study.recorder.record(
        Result(
            benchmark, provider, str(budget), study.dtype, status=status, value=value, unit=unit, note=note
        )
    )


def write_report(csv_path: Path, path: Path) -> None:
    """One table per fixture and pair: every measure as mean ± sample std over the seeds present."""
    latest: dict[tuple[str, str, str, str], dict[str, float]] = {}
    for row in read_rows(csv_path):
        match = SEED_PATTERN.search(row["shape"])
        if row["status"] != "ok" or not row["value"] or match is None:
            continue
        key = (row["shape"][: match.start()], row["dtype"], row["provider"], row["benchmark"])
        latest.setdefault(key, {})[match.group(1)] = float(row["value"])
    lines = [
        "# PrunedLoRA: rank 8, rank 64 and 64 → 8 (`--criterion lora`), mean ± sample std over seeds",
        "",
    ]
    for budget, dtype in dict.fromkeys(k[:2] for k in latest):
        subset = {k[2:]: v for k, v in latest.items() if k[:2] == (budget, dtype)}
        columns = list(dict.fromkeys(k[1] for k in subset))
        providers = sorted(dict.fromkeys(k[0] for k in subset), key=_order)
        lines += [f"## {budget}, {dtype}", "", "| method | " + " | ".join(columns) + " | seeds |"]
        lines.append("|---" * (len(columns) + 2) + "|")
        for provider in providers:
            cells, seeds = [], 0
            for column in columns:
                found = list(subset.get((provider, column), {}).values())
                seeds = max(seeds, len(found))
                if not found:
                    cells.append("–")
                    continue
                mean = statistics.fmean(found)
                std = statistics.stdev(found) if len(found) > 1 else 0.0
                digits = 1 if column.startswith("perplexity") else 3
                cells.append(f"{mean:.{digits}f} ± {std:.{digits}f}")
            lines.append(f"| {provider} | " + " | ".join(cells) + f" | {seeds} |")
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def _order(provider: str) -> tuple[float, int]:
    method, ratio = provider.rsplit(" ", 1)
    return (-float(ratio.rstrip("%")), list(METHODS).index(method) if method in METHODS else len(METHODS))


if __name__ == "__main__":
    raise SystemExit(main())
