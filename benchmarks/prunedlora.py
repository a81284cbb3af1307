"""PrunedLoRA study: LoRA-guided pruning at rank 8, at rank 64, and 64 → 8 with rank pruning.

Every configuration prunes a tiny fixture through the ``loraprune`` command line (one subprocess
each, so each has its own peak memory) with ``--criterion lora`` and the quality study's budget;
only the LoRA rank and the rank schedule change:

- ``r8``: ``--lora-r 8`` throughout; ``r64``: ``--lora-r 64`` throughout;
- ``r64-to-8``: ``--lora-r 64 --lora-final-r 8`` (PrunedLoRA, default schedule and
  ``--lora-alpha-mode rank``, so it starts as ``r64`` with the same scaling ``16/64``).

Rows (``benchmarks/results/prunedlora.csv``; ``shape`` names fixture, pair, budget and seed):
perplexity on each evaluation set of the pair, the pruning process's peak resident memory
(``VmHWM`` on the CPU, ``max_memory_allocated`` on CUDA: ``peak_memory_bytes`` of
``prune_report.json``), for ``r64-to-8`` also the peak from the last rank removal on, and the mean
step time (the run's wall time over its steps). Finished rows are not run again (the study
resumes); ``prunedlora.md`` is rebuilt from the CSV (mean ± sample std over the seeds present).

    python -m benchmarks.prunedlora --steps 20 --batch-size 2 --seq-len 128 --prune-every 2 \\
        --eval-seq-len 128 --max-windows 32 --ratios 0.5,0.2 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.harness import DEFAULT_RESULTS_DIR, GIB, REPO_ROOT, Recorder, Result, read_rows, shared_dir
from benchmarks.quality import CHECKPOINT_NAME, FIXTURES, PAIRS, REPORT_NAME, SEED_PATTERN, Budget, QualityRun

METHODS = {  # name: extra CLI flags (all --criterion lora)
    "r8": ("--lora-r", "8"),
    "r64": ("--lora-r", "64"),
    "r64-to-8": ("--lora-r", "64", "--lora-final-r", "8"),
}
MEMORY = "peak memory"
MEMORY_AFTER_RANK = "peak memory after the last rank removal"
STEP_TIME = "step time"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.prunedlora", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--ratios", default="0.5,0.2")
    parser.add_argument("--methods", default=",".join(METHODS))
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
        args.eval_seq_len,
        args.max_windows,
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
    shared = shared_dir()
    out = study.args.work_dir / f"{method}-{ratio:g}-{str(budget).replace(' ', '-')}-{study.dtype}"
    command = [
        *("prune", str(shared.joinpath(*FIXTURES[budget.fixture]))),
        *("--data", str(shared.joinpath(*calibration)), "--out", str(out), "--criterion", "lora"),
        *("--ratio", str(ratio), *METHODS[method], "--steps", str(budget.steps)),
        *("--batch-size", str(budget.batch_size), "--seq-len", str(budget.seq_len), "--lr", str(budget.lr)),
        *("--seed", str(budget.seed), "--prune-every", str(budget.prune_every)),
        *(arg for parts in evals.values() for arg in ("--eval-data", str(shared.joinpath(*parts)))),
        *("--eval-seq-len", str(study.eval_seq_len), "--eval-max-windows", str(study.max_windows)),
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
            f"perplexity {name} seq={study.eval_seq_len}",
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
