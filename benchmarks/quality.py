"""Study 4: perplexity after pruning the tiny-llama fixture (the paper's Table 2 on what exists here).

Every configuration prunes the same checkpoint with the same calibration text, steps, batch,
learning rate and seed, through the ``loraprune`` command line (one subprocess per command):

- ``dense``: the unpruned fixture (``loraprune eval`` only).
- ``lora-iterative``: LoRAPrune (``--criterion lora --mode iterative``).
- ``taylor-oneshot``: LLM-Pruner (``--criterion taylor --mode oneshot``) + the same LoRA recovery.
- ``taylor-iterative``: the full-gradient criterion on LoRAPrune's schedule.
- ``magnitude``, ``random``: one-shot baselines + the same LoRA recovery.

each at 20 % and 50 %, evaluated on WikiText-2 test and PTB test at sequence lengths 512 and
128 (the 512 evaluations run inside ``loraprune prune --eval-data``, the others through
``loraprune eval``). Rows go to quality.csv and the table to quality.md. Finished rows are not
run again (same budget, dtype and eval set), so the study can be split (``--ratios``,
``--methods``) over several runs; checkpoints stay under ``--work-dir``.

    python -m benchmarks.quality [--quick] [--ratios 0.2,0.5] [--methods lora-iterative,...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.harness import (
    DEFAULT_RESULTS_DIR,
    REPO_ROOT,
    Recorder,
    Result,
    read_rows,
    results_table,
    shared_dir,
)

METHODS = {  # name: (criterion, mode)
    "lora-iterative": ("lora", "iterative"),
    "taylor-oneshot": ("taylor", "oneshot"),
    "taylor-iterative": ("taylor", "iterative"),
    "magnitude": ("magnitude", "oneshot"),
    "random": ("random", "oneshot"),
}
EVAL_SETS = {"wikitext-2-test": ("data", "wikitext-2", "test.txt"), "ptb-test": ("data", "ptb", "test.txt")}
CALIBRATION_TEXT = ("data", "calib-wikitext103-train-part.txt")
FIXTURE = ("fixtures", "tiny-llama")
REFERENCE = "dense"
FINETUNED_REFERENCE = "lora-iterative"  # at ratio 0: the dense model after the same LoRA fine-tuning
REPORT_NAME = "prune_report.json"
CHECKPOINT_NAME = "checkpoint.safetensors"


@dataclass(frozen=True)
class Budget:
    """What every configuration shares; its text is the ``shape`` of the rows."""

    steps: int
    batch_size: int
    seq_len: int
    lr: float
    prune_every: int
    seed: int

    def __str__(self) -> str:
        return (
            f"tiny-llama steps={self.steps} batch={self.batch_size}x{self.seq_len} lr={self.lr:g} "
            f"prune_every={self.prune_every} seed={self.seed}"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="30 steps of 4x256, 50%% only, seq len 512, 32 windows"
    )
    parser.add_argument("--ratios", help="comma-separated pruning ratios (default 0.2,0.5; quick 0.5)")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated subset of {list(METHODS)}"
    )
    parser.add_argument("--steps", type=int, help="optimizer steps per configuration (default 300, quick 30)")
    parser.add_argument("--batch-size", type=int, help="sequences per step (default 8, quick 4)")
    parser.add_argument("--seq-len", type=int, help="training sequence length (default 512, quick 256)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prune-every", type=int, default=10)
    parser.add_argument("--eval-seq-lens", help="comma-separated (default 512,128; quick 512)")
    parser.add_argument("--max-windows", type=int, help="evaluation windows per set (default all, quick 32)")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR)
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=REPO_ROOT / "benchmarks" / ".work" / "quality",
        help="pruned checkpoints",
    )
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed to one CLI command")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    shared = shared_dir()
    fixture, calibration = shared.joinpath(*FIXTURE), shared.joinpath(*CALIBRATION_TEXT)
    eval_files = {name: shared.joinpath(*parts) for name, parts in EVAL_SETS.items()}
    missing = [str(p) for p in (fixture, calibration, *eval_files.values()) if not p.exists()]
    if missing:
        print(f"SKIPPED the quality study: {', '.join(missing)} not found (set LORAPRUNE_SHARED to shared/).")
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = "bfloat16" if device.type == "cuda" else "float32"  # the CLI's own defaults, made explicit
    budget = Budget(
        steps=args.steps or (30 if args.quick else 300),
        batch_size=args.batch_size or (4 if args.quick else 8),
        seq_len=args.seq_len or (256 if args.quick else 512),
        lr=args.lr,
        prune_every=args.prune_every,
        seed=args.seed,
    )
    ratios = [float(r) for r in (args.ratios or ("0.5" if args.quick else "0.2,0.5")).split(",")]
    methods = args.methods.split(",")
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"--methods: unknown {sorted(unknown)}; choose from {list(METHODS)}")
    seq_lens = [int(s) for s in (args.eval_seq_lens or ("512" if args.quick else "512,128")).split(",")]
    max_windows = args.max_windows or (32 if args.quick else None)

    recorder = Recorder(args.results_dir, "quality", device)
    done = {
        (r["benchmark"], r["provider"])
        for r in read_rows(recorder.path)
        if r["status"] == "ok" and r["shape"] == str(budget) and r["dtype"] == dtype
    }
    recorder.remember(
        r for r in read_rows(recorder.path) if r["shape"] == str(budget) and r["dtype"] == dtype
    )
    study = QualityRun(recorder, budget, dtype, device, eval_files, seq_lens, max_windows, done, args)
    study.evaluate_dense(fixture)
    # The same LoRA budget without pruning: fine-tuning on the calibration text moves perplexity on
    # its own (here in-domain for WikiText-2), so this row, not the untouched fixture, isolates the
    # damage that pruning does.
    study.prune_and_evaluate(fixture, calibration, FINETUNED_REFERENCE, 0.0)
    for ratio in ratios:
        for method in methods:
            study.prune_and_evaluate(fixture, calibration, method, ratio)
    write_markdown(recorder.path, args.results_dir / "quality.md")
    print(results_table(recorder.rows))
    print(f"\n{args.results_dir / 'quality.md'}:\n{(args.results_dir / 'quality.md').read_text()}")
    return 0


def benchmark_name(eval_set: str, seq_len: int) -> str:
    return f"perplexity {eval_set} seq={seq_len}"


@dataclass
class QualityRun:
    recorder: Recorder
    budget: Budget
    dtype: str
    device: torch.device
    eval_files: dict[str, Path]
    seq_lens: list[int]
    max_windows: int | None
    done: set[tuple[str, str]]
    args: argparse.Namespace

    def pending(self, provider: str, seq_lens: Sequence[int]) -> list[tuple[str, int]]:
        return [
            (name, seq)
            for seq in seq_lens
            for name in self.eval_files
            if (benchmark_name(name, seq), provider) not in self.done
        ]

    def evaluate_dense(self, fixture: Path) -> None:
        for eval_set, seq_len in self.pending(REFERENCE, self.seq_lens):
            self.evaluate(fixture, REFERENCE, eval_set, seq_len)

    def prune_and_evaluate(self, fixture: Path, calibration: Path, method: str, ratio: float) -> None:
        provider = f"{method} {ratio:.0%}"
        if not self.pending(provider, self.seq_lens):
            print(f"{provider}: already in {self.recorder.path}, skipped")
            return
        out = self.args.work_dir / f"{method}-{ratio:g}-{str(self.budget).replace(' ', '-')}-{self.dtype}"
        first_seq = self.seq_lens[0]
        if not (out / REPORT_NAME).exists():
            criterion, mode = METHODS[method]
            command = [
                *("prune", str(fixture), "--data", str(calibration), "--out", str(out)),
                *("--ratio", str(ratio), "--criterion", criterion, "--mode", mode),
                *("--steps", str(self.budget.steps), "--batch-size", str(self.budget.batch_size)),
                *("--seq-len", str(self.budget.seq_len), "--lr", str(self.budget.lr)),
                *("--seed", str(self.budget.seed), "--prune-every", str(self.budget.prune_every)),
                *(arg for path in self.eval_files.values() for arg in ("--eval-data", str(path))),
                *("--eval-seq-len", str(first_seq)),
                *(("--eval-max-windows", str(self.max_windows)) if self.max_windows else ()),
                "--resume" if (out / CHECKPOINT_NAME).exists() else "--overwrite",
            ]
            failure = self.cli(command)
            if failure:
                for eval_set, seq_len in self.pending(provider, self.seq_lens):
                    self.record(provider, eval_set, seq_len, None, note=failure, status="error")
                return
        report = json.loads((out / REPORT_NAME).read_text())
        note = (
            f"kept {report['parameters']['ratio']:.1%} of parameters; final loss {report['final_loss']:.3f}; "
            f"{report['wall_time_s']:.0f} s"
        )
        reported = dict(zip(self.eval_files, report["eval"], strict=True))  # --eval-data order
        for eval_set, seq_len in self.pending(provider, self.seq_lens):
            if seq_len == first_seq and reported[eval_set]["seq_len"] == seq_len:
                self.record(provider, eval_set, seq_len, reported[eval_set], note)
            else:
                self.evaluate(out, provider, eval_set, seq_len, note)

    def evaluate(self, model_dir: Path, provider: str, eval_set: str, seq_len: int, note: str = "") -> None:
        command = [
            *("eval", str(model_dir), "--data", str(self.eval_files[eval_set]), "--seq-len", str(seq_len)),
            *(("--max-windows", str(self.max_windows)) if self.max_windows else ()),
            "--json",
        ]
        output: list[str] = []
        failure = self.cli(command, output)
        result = None if failure else json.loads(output[-1])
        self.record(
            provider, eval_set, seq_len, result, note=failure or note, status="error" if failure else "ok"
        )

    def cli(self, arguments: list[str], output: list[str] | None = None) -> str:
        """Run ``loraprune ARGUMENTS`` on the study's device and dtype; returns '' or why it failed."""
        command = [
            *(sys.executable, "-m", "loraprune.cli", *arguments),
            *("--device", self.device.type, "--dtype", self.dtype, "--quiet"),
        ]
        print("$ loraprune " + " ".join(arguments), flush=True)
        try:
            done = subprocess.run(
                command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=self.args.timeout
            )
        except subprocess.TimeoutExpired:
            return f"no result within {self.args.timeout} s"
        if done.returncode:
            tail = " | ".join(done.stderr.strip().splitlines()[-3:])
            return f"exit {done.returncode}: {tail}"[:400]
        if output is not None:
            output += done.stdout.strip().splitlines()
        return ""

    def record(
        self, provider: str, eval_set: str, seq_len: int, result: dict | None, note: str, status: str = "ok"
    ) -> None:
        windows = f"{result['windows']} windows of {seq_len}; " if result else ""
        self.recorder.record(
            Result(
                benchmark_name(eval_set, seq_len),
                provider,
                str(self.budget),
                self.dtype,
                status=status,
                value=result["perplexity"] if result else None,
                unit="ppl",
                reference=REFERENCE,
                repetitions=1 if result else None,
                note=windows + note,
            )
        )


def write_markdown(csv_path: Path, markdown_path: Path) -> None:
    """One table per budget and dtype: methods × ratios down, eval sets × sequence lengths across."""
    rows = [r for r in read_rows(csv_path) if r["status"] == "ok"]
    lines = [
        "# Quality: perplexity after pruning tiny-llama",
        "",
        f"`{REFERENCE}` is the untouched fixture; `{FINETUNED_REFERENCE} 0%` is the same model after the same "
        "LoRA fine-tuning without pruning, the reference for the damage pruning does.",
        "",
    ]
    for budget, dtype in dict.fromkeys((r["shape"], r["dtype"]) for r in rows):
        subset = [r for r in rows if (r["shape"], r["dtype"]) == (budget, dtype)]
        latest = {(r["provider"], r["benchmark"]): r for r in subset}  # a later run replaces an earlier one
        columns = list(dict.fromkeys(r["benchmark"] for r in subset))
        providers = sorted(dict.fromkeys(r["provider"] for r in subset), key=_provider_order)
        lines += [
            f"## {budget}, {dtype}",
            "",
            "| method | " + " | ".join(c.removeprefix("perplexity ") for c in columns) + " |",
        ]
        lines.append("|---" * (len(columns) + 1) + "|")
        for provider in providers:
            cells = [latest[(provider, c)]["value"] if (provider, c) in latest else "" for c in columns]
            lines.append(f"| {provider} | " + " | ".join(_ppl(v) for v in cells) + " |")
        lines.append("")
    markdown_path.parent.mkdir(parents=True, exist_ok=True)
    markdown_path.write_text("\n".join(lines))


def _provider_order(provider: str) -> tuple[float, int]:
    if provider == REFERENCE:
        return (0.0, -1)
    method, ratio = provider.rsplit(" ", 1)
    return (float(ratio.rstrip("%")), list(METHODS).index(method) if method in METHODS else len(METHODS))


def _ppl(value: str) -> str:
    return f"{float(value):.2f}" if value else "–"


if __name__ == "__main__":
    raise SystemExit(main())
