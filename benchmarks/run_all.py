"""Run the whole suite in one command and print a short summary table last.

    python -m benchmarks.run_all --quick [--studies kernels,pruning,inference,quality] [--results-dir DIR]

Each study runs in its own process (a failure or a leak in one cannot spoil the next), in this
order: kernels (``pytest benchmarks/test_kernels.py --benchmark-only``), pruning, inference,
quality. All rows of one invocation share one run id. The three GPU studies are skipped with a
message when torch sees no CUDA device; the quality study runs on the CPU too (slowly).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.harness import (
    DEFAULT_RESULTS_DIR,
    REPO_ROOT,
    RUN_ID_ENV,
    format_table,
    new_run_id,
    read_rows,
    short,
)

STUDIES = ("kernels", "pruning", "inference", "quality")
GPU_STUDIES = ("kernels", "pruning", "inference")


def study_command(study: str, quick: bool, results_dir: Path) -> list[str]:
    common = ["--results-dir", str(results_dir), *(["--quick"] if quick else [])]
    if study == "kernels":
        return [
            *(sys.executable, "-m", "pytest", "benchmarks/test_kernels.py", "--benchmark-only", "-q"),
            *("-p", "no:cacheprovider", "--benchmark-group-by=param:case"),
            "--benchmark-columns=median,iqr,rounds,iterations",
            *common,
        ]
    module = {"pruning": "pruning_memory", "inference": "inference", "quality": "quality"}[study]
    return [sys.executable, "-m", f"benchmarks.{module}", *common]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="every study at its quick size (one device call)"
    )
    parser.add_argument("--studies", default=",".join(STUDIES), help=f"comma-separated subset of {STUDIES}")
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR)
    args = parser.parse_args(argv)
    studies = args.studies.split(",")
    unknown = set(studies) - set(STUDIES)
    if unknown:
        parser.error(f"--studies: unknown {sorted(unknown)}; choose from {STUDIES}")
    run_id = new_run_id()
    env = {**os.environ, RUN_ID_ENV: run_id, "PYTHONUNBUFFERED": "1"}
    has_cuda = torch.cuda.is_available()
    outcomes = []
    for study in (s for s in STUDIES if s in studies):
        if study in GPU_STUDIES and not has_cuda:
            outcomes.append({"study": study, "status": "skipped: no CUDA device", "minutes": ""})
            continue
        print(f"\n===== {study} =====", flush=True)
        start = time.monotonic()
        code = subprocess.run(
            study_command(study, args.quick, args.results_dir), cwd=REPO_ROOT, env=env
        ).returncode
        status = "ok" if code == 0 else f"exit {code}"
        outcomes.append(
            {"study": study, "status": status, "minutes": f"{(time.monotonic() - start) / 60:.1f}"}
        )
    print(f"\n===== summary of run {run_id} ({args.results_dir}) =====")
    print(summary(args.results_dir, run_id))
    print()
    print(format_table(outcomes, ["study", "status", "minutes"]))
    return 0 if all(o["status"] in ("ok", "skipped: no CUDA device") for o in outcomes) else 1


def summary(results_dir: Path, run_id: str) -> str:
    """The headline figures of one run, one short table per study that produced rows."""
    sections = []
    for study, summarize in (
        ("kernels", kernels_summary),
        ("pruning", lambda rows: values_summary(rows, speedup=False)),
        ("inference", lambda rows: values_summary(rows, speedup=True)),
        ("quality", quality_summary),
    ):
        rows = [r for r in read_rows(results_dir / f"{study}.csv") if r["run_id"] == run_id]
        rows = [r for r in rows if not r["benchmark"].startswith("calibration")]
        if rows:
            sections.append(f"[{study}]\n{summarize(rows)}")
    return "\n\n".join(sections) or "no result rows were written"


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def kernels_summary(rows: list[dict[str, str]]) -> str:
    """Per benchmark and provider: geometric means over the cases of ×floor and of the speed-up over the reference."""
    table = []
    for benchmark in dict.fromkeys(r["benchmark"] for r in rows):
        for provider in dict.fromkeys(r["provider"] for r in rows if r["benchmark"] == benchmark):
            subset = [r for r in rows if (r["benchmark"], r["provider"]) == (benchmark, provider)]
            ok = [r for r in subset if r["status"] == "ok"]
            entry = {"benchmark": benchmark, "provider": provider, "ok": f"{len(ok)}/{len(subset)}"}
            if ok:
                entry["median value"] = (
                    f"{statistics.median(float(r['value']) for r in ok):.4g} {ok[0]['unit']}"
                )
                floors = [float(r["ratio_to_floor"]) for r in ok if r["ratio_to_floor"]]
                speedups = [1 / float(r["ratio_to_reference"]) for r in ok if r["ratio_to_reference"]]
                entry["x floor (geomean)"] = f"{_geomean(floors):.2f}" if floors else ""
                entry["speed-up vs ref (geomean)"] = (
                    f"{_geomean(speedups):.2f} vs {ok[0]['reference']}" if speedups else ""
                )
            else:
                entry["median value"] = subset[0]["note"][:60]
            table.append(entry)
    columns = [
        "benchmark",
        "provider",
        "ok",
        "median value",
        "x floor (geomean)",
        "speed-up vs ref (geomean)",
    ]
    return format_table(table, columns)


def values_summary(rows: list[dict[str, str]], speedup: bool) -> str:
    """Every row with its floor and, as a speed-up or a ratio, its comparison with the reference."""
    table = []
    for r in rows:
        value = (
            f"{short(r['value'], 4)} {r['unit']}"
            if r["status"] == "ok"
            else f"{r['status']}: {r['note'][:50]}"
        )
        ratio = r["ratio_to_reference"]
        relative = f"{1 / float(ratio):.2f}x" if speedup and ratio else short(ratio)
        table.append(
            {
                "benchmark": r["benchmark"],
                "shape": r["shape"],
                "provider": r["provider"],
                "value": value,
                "floor": short(r["floor"]),
                "speed-up" if speedup else "x ref": relative,
            }
        )
    return format_table(
        table, ["benchmark", "shape", "provider", "value", "floor", "speed-up" if speedup else "x ref"]
    )


def quality_summary(rows: list[dict[str, str]]) -> str:
    table = [
        {
            "eval": r["benchmark"].removeprefix("perplexity "),
            "method": r["provider"],
            "ppl": short(r["value"], 4) if r["status"] == "ok" else r["status"],
            "x dense": short(r["ratio_to_reference"]),
        }
        for r in rows
        if r["benchmark"].startswith("perplexity ")
    ]
    return format_table(table, ["eval", "method", "ppl", "x dense"])


if __name__ == "__main__":
    raise SystemExit(main())
