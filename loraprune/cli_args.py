"""The ``loraprune`` command line's arguments: every subcommand, flag, default and help text.

Types reject bad values with argparse's own one-line error (``_Parser``); what needs the model or
files is checked by the commands in :mod:`loraprune.cli`.
"""

from __future__ import annotations

import argparse

from loraprune.config import CRITERIA, LORA_ALPHA_MODES, LORA_MEMBERS, TAYLOR_IMPLS
from loraprune.lorashear import ALL_LAYERS, METHODS, PROTECT_FRACTION
from loraprune.protect import PROTECT_BY
from loraprune.recovery import RECOVERY_RULES

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line instead of argparse's usage dump."""
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _ratio(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _layers(text: str) -> tuple[int, ...] | str:
    if text == ALL_LAYERS:
        return ALL_LAYERS
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated layer indices or {ALL_LAYERS!r}, got {text!r}"
        ) from None


def _add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model_dir",
        metavar="MODEL",
        help="a Hugging Face folder, a Hub id (org/name: from the cache, or downloaded) or a .gguf file",
    )
    parser.add_argument("--revision", default=None, help="with a Hub id: a branch, tag or commit")


def _add_runtime_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="weight dtype; on CUDA also the autocast dtype (default: bfloat16 on CUDA, float32 on CPU)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars or chatter")


def _add_lorashear_flags(prune: argparse.ArgumentParser) -> None:
    """LoRAShear's parts (loraprune.lorashear): each its own option, all on with --method lorashear."""
    prune.add_argument(
        "--method",
        default="loraprune",
        choices=list(METHODS),
        help="loraprune (default); lorashear: LoRAShear's knowledge-distribution protection and fade on, "
        f"all layers pruned (defaults --protect-fraction {PROTECT_FRACTION}, --fade-steps = --prune-every, "
        "--layers all; each flag overrides), and the staged recovery where --recovery-data is given",
    )
    prune.add_argument(
        "--protect-fraction",
        type=_ratio,
        default=None,
        metavar="GAMMA",
        help="before pruning, measure the held-out loss increase of removing each structure and never prune "
        "the most damaging fraction GAMMA of them, per kind (default 0: off; lorashear: "
        f"{PROTECT_FRACTION})",
    )
    prune.add_argument(
        "--protect-by",
        choices=list(PROTECT_BY),
        default=None,
        help="with --protect-fraction: layer (each layer's attention or MLP removed whole, two held-out passes "
        "a layer; protected ones are left whole; default) or unit (each head/KV group and channel removed "
        "alone, one pass each: the paper's granularity, slow for wide MLPs)",
    )
    prune.add_argument(
        "--heldout-windows",
        type=_positive_int,
        default=None,
        metavar="N",
        help="with --protect-fraction or --recovery-data: windows of --seq-len held out of each source, never "
        "trained on (default 16)",
    )
    prune.add_argument(
        "--fade-steps",
        type=_non_negative_int,
        default=None,
        metavar="N",
        help="LHSPG: a chosen unit's frozen base fades to zero over N steps while LoRA trains (m·W + s·B·A, "
        "m from 1 to 0), then it is masked; selections end N steps before the cool-down so that the target "
        "is masked there (default 0: masked at once; lorashear: --prune-every)",
    )
    prune.add_argument(
        "--fade-epsilon",
        type=float,
        default=None,
        metavar="EPS",
        help="with --fade-steps: a fading unit is masked early when an update crosses the half-space of its "
        "direction, <x, x_new> < EPS·|x|^2 (default 0)",
    )
    prune.add_argument(
        "--recovery-data",
        action="append",
        default=[],
        metavar="SOURCE",
        help="dynamic knowledge recovery: another text source (as --data; repeatable); the cool-down trains in "
        "stages, each on the source (this or --data) whose held-out loss deviates most from the unpruned "
        "model's",
    )
    prune.add_argument(
        "--recovery-stages",
        type=_positive_int,
        default=None,
        metavar="K",
        help="with --recovery-data: stages of the cool-down, each choosing its source (default: one per source)",
    )
    prune.add_argument(
        "--recovery-rule",
        choices=list(RECOVERY_RULES),
        default=None,
        help="with --recovery-data: deviation (the largest held-out loss above the unpruned model's; default) "
        "or drop (the largest fall of the held-out loss in the previous stage)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="loraprune",
        description="Structured pruning of LLaMA-family models while LoRA fine-tunes them (LoRAPrune), "
        "with fused kernels.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    prune = commands.add_parser("prune", help="prune a checkpoint while LoRA fine-tunes, then compact it")
    _add_model_argument(prune)
    prune.add_argument(
        "--data",
        required=True,
        help="calibration/fine-tuning text: a file, a directory of "
        "*.txt, or hf:NAME[:CONFIG][@SPLIT] with the datasets library",
    )
    prune.add_argument("--ratio", type=_ratio, required=True, help="fraction of heads and channels to remove")
    prune.add_argument("--steps", type=_positive_int, required=True, help="optimizer steps T")
    prune.add_argument("--out", required=True, metavar="OUT_DIR", help="where the pruned model is written")
    prune.add_argument(
        "--criterion",
        default="act",
        choices=list(CRITERIA),
        help="importance: act (default: first-order Taylor of heads/channels from activations), lora (LoRAPrune "
        "estimate), taylor (first-order Taylor of the weights), magnitude, reconstruction (the o_proj/down_proj "
        "output error the closed-form refit cannot undo), random",
    )
    prune.add_argument(
        "--taylor-impl",
        choices=list(TAYLOR_IMPLS),
        help="taylor only: fused (default; from layer inputs and output gradients, no weight gradient) "
        "or materialized (the frozen weights' gradients: more memory)",
    )
    prune.add_argument(
        "--squared",
        action="store_true",
        help="squared element importance (lora, taylor); the per-sequence Fisher form for act",
    )
    prune.add_argument(
        "--lora-members",
        choices=list(LORA_MEMBERS),
        help="lora only: score groups from all member matrices (default), or from the row members only "
        "(q/k/v, gate/up)",
    )
    prune.add_argument(
        "--mode",
        default="iterative",
        choices=["iterative", "oneshot"],
        help="iterative: prune on a cubic schedule while fine-tuning (LoRAPrune); oneshot: "
        "score on calibration batches, prune, then fine-tune (LLM-Pruner)",
    )
    prune.add_argument("--lora-r", type=_positive_int, default=8)
    prune.add_argument(
        "--lora-final-r",
        type=_positive_int,
        default=None,
        metavar="R",
        help="PrunedLoRA: start the adapters at --lora-r and prune their rank components to R while they "
        "train, by the start of the cool-down (default: the rank stays --lora-r)",
    )
    prune.add_argument(
        "--lora-alpha-mode",
        default="rank",
        choices=list(LORA_ALPHA_MODES),
        help="with --lora-final-r: rank (alpha follows the rank: the scaling stays alpha / --lora-r) or "
        "fixed (alpha stays: the scaling becomes alpha / the current rank)",
    )
    prune.add_argument(
        "--rank-prune-every",
        type=_positive_int,
        default=None,
        metavar="K1",
        help="with --lora-final-r: steps between rank removals (default: 10, or fewer to finish in time)",
    )
    prune.add_argument(
        "--rank-prune-count",
        type=_positive_int,
        default=None,
        metavar="K2",
        help="with --lora-final-r: components removed per adapter each time (default: 2, or more to finish "
        "in time)",
    )
    prune.add_argument("--lora-alpha", type=float, default=16.0)
    prune.add_argument("--lora-dropout", type=float, default=0.05)
    prune.add_argument("--lr", type=float, default=1e-4)
    prune.add_argument("--batch-size", type=_positive_int, default=8)
    prune.add_argument("--grad-accum", type=_positive_int, default=1, help="micro-batches per optimizer step")
    prune.add_argument("--max-grad-norm", type=float, default=1.0)
    prune.add_argument("--seq-len", type=_positive_int, default=512)
    prune.add_argument("--prune-every", type=_positive_int, default=10)
    prune.add_argument("--warmup", type=float, default=0.1, help="fraction of steps before pruning starts")
    prune.add_argument(
        "--cooldown", type=float, default=0.1, help="fraction of steps after the target is reached"
    )
    prune.add_argument(
        "--calib-batches", type=_positive_int, default=8, help="scoring batches in oneshot mode"
    )
    prune.add_argument(
        "--calib-seq-len",
        type=_positive_int,
        default=None,
        help="oneshot: score on the first N tokens of each calibration window (default: --seq-len; "
        "LLM-Pruner's recipe scores 10 samples of 128 tokens)",
    )
    prune.add_argument(
        "--round-to", type=_positive_int, default=1, help="keep MLP channel counts at multiples"
    )
    prune.add_argument("--ranking", default="local", choices=["local", "global"])
    prune.add_argument("--gqa-unit", default="kv_group", choices=["kv_group", "q_head"])
    prune.add_argument(
        "--layers",
        type=_layers,
        default=None,
        help="comma-separated layers to prune, or 'all' (default: all but the first 10%% and the last; "
        "--method lorashear: all)",
    )
    prune.add_argument("--ema-decay", type=float, default=0.9)
    prune.add_argument(
        "--distill-weight",
        type=float,
        default=0.0,
        metavar="ALPHA",
        help="distil from the unpruned model while fine-tuning: loss (1-ALPHA)·CE + ALPHA·T²·KL(teacher‖student), "
        "the teacher being the frozen base with masks and LoRA off (one extra forward per step, no copy of "
        "the weights; default 0: off, the real-model study found no gain; 0.5 was its setting)",
    )
    prune.add_argument(
        "--distill-temperature",
        type=float,
        default=None,
        metavar="T",
        help="the distillation's softmax temperature (default 1)",
    )
    prune.add_argument(
        "--reconstruct",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="after the final masks, refit the kept columns of o_proj and down_proj in closed form (ridge "
        "least squares toward the original weights, on calibration windows run through the pruned model "
        "one layer at a time; default: on, except over several devices)",
    )
    prune.add_argument(
        "--reconstruct-lambda",
        type=float,
        default=None,
        metavar="LAMBDA",
        help="the refit's ridge, relative to the mean diagonal of the input covariance "
        "(default 0.01; 0: plain least squares)",
    )
    prune.add_argument(
        "--reconstruct-samples",
        type=_positive_int,
        default=None,
        metavar="N",
        help="the refit's calibration windows of --seq-len tokens drawn from --data (default 64, at most "
        "the windows --data holds)",
    )
    _add_lorashear_flags(prune)
    prune.add_argument("--seed", type=int, default=0)
    prune.add_argument(
        "--quantize-base",
        default=None,
        choices=["int8", "nf4"],
        help="hold the frozen weights in 8 or 4 bits (bitsandbytes) while LoRA stays fp32; the pruned "
        "model is written dense in --dtype",
    )
    prune.add_argument(
        "--device-map",
        default=None,
        metavar="auto|balanced|FILE.json",
        help="hold the model over several devices (accelerate's big-model dispatch): whole layers per "
        "device, from a JSON map of module name -> device",
    )
    prune.add_argument(
        "--save-every", type=_non_negative_int, default=50, help="checkpoint period in steps (0: off)"
    )
    prune.add_argument(
        "--stop-after",
        type=_positive_int,
        default=None,
        help="stop after this many steps, leaving a checkpoint for --resume",
    )
    prune.add_argument("--resume", action="store_true", help="continue from OUT_DIR's checkpoint")
    prune.add_argument("--overwrite", action="store_true", help="write into an existing OUT_DIR")
    prune.add_argument(
        "--eval-data",
        action="append",
        default=[],
        metavar="FILE",
        help="perplexity after pruning on this text (repeatable)",
    )
    prune.add_argument("--eval-seq-len", type=_positive_int, default=512)
    prune.add_argument("--eval-max-windows", type=_positive_int, default=None)
    _add_runtime_flags(prune)

    evaluate = commands.add_parser("eval", help="perplexity of a checkpoint on a text file")
    _add_model_argument(evaluate)
    evaluate.add_argument("--data", required=True, help="text file (or directory of *.txt)")
    evaluate.add_argument("--seq-len", type=_positive_int, default=512)
    evaluate.add_argument("--max-windows", type=_positive_int, default=None)
    evaluate.add_argument("--batch-size", type=_positive_int, default=8)
    evaluate.add_argument(
        "--tasks", default=None, help="comma-separated lm-evaluation-harness tasks (needs lm_eval)"
    )
    evaluate.add_argument("--json", action="store_true", help="print a JSON object")
    _add_runtime_flags(evaluate)

    info = commands.add_parser("info", help="per-layer structure of a checkpoint")
    _add_model_argument(info)
    info.add_argument("--json", action="store_true")

    export = commands.add_parser("export", help="write a checkpoint for a serving engine")
    formats = export.add_subparsers(dest="format", required=True)
    gguf = formats.add_parser(
        "gguf", help="GGUF for llama.cpp (its deci architecture: per-layer head and channel counts)"
    )
    _add_model_argument(gguf)
    gguf.add_argument("out", metavar="OUT.gguf", help="the GGUF file to write")
    gguf.add_argument(
        "--outtype",
        default=None,
        help="matrix type (norms stay f32): f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, or a llama.cpp type "
        "such as q4_k_m (through llama-cpp-python's quantizer); block types write f16 where rows are not "
        "a multiple of 32 (default: the type of the GGUF file the model came from, else f16)",
    )
    gguf.add_argument("--overwrite", action="store_true", help="replace an existing OUT.gguf")
    return parser
