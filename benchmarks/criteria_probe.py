"""Which criterion chooses best while ``B ≈ 0``: one-shot prune at step 0, held-out loss, no recovery.

For each fixture, calibration pair and criterion: score on ``--batches`` calibration batches
with freshly initialised LoRA (``B = 0``, no optimizer step: the regime of the first pruning steps
of an iterative run), prune to ``--ratio`` at once, and measure the held-out loss on the pair's
test text without any fine-tuning. It isolates the first decisions, which masks never undo.
Variants of the LoRA estimate probed here:

- ``lora``, ``lora-squared``: the estimate, ``|·|`` and squared.
- ``lora-rows``: only the row members (q/k/v, gate/up) vote; with ``B = 0`` a column member's
  estimate (o_proj, down_proj) mixes all columns' gradients through ``AᵀA``.
- ``lora-r64``: a larger LoRA rank (64) for the same estimate.

Rows go to ``criteria_probe.csv`` (value: held-out mean token loss; the reference is ``dense``).

    python -m benchmarks.criteria_probe [--fixtures tiny-llama,tiny-llama-gqa] [--pairs wikitext,docs]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from benchmarks.harness import DEFAULT_RESULTS_DIR, Recorder, Result, read_rows, shared_dir
from benchmarks.quality import FIXTURES, PAIRS
from loraprune import LoraPruneConfig, LoraPruner
from loraprune.data import read_text, tokenize, windows
from loraprune.io import load_model, load_tokenizer

VARIANTS = {  # name: (config overrides, rows only)
    "lora": ({"criterion": "lora"}, False),
    "lora-squared": ({"criterion": "lora", "squared": True}, False),
    "lora-rows": ({"criterion": "lora"}, True),
    "lora-r64": ({"criterion": "lora", "lora_r": 64, "lora_alpha": 128.0}, False),
    "taylor": ({"criterion": "taylor"}, False),
    "act": ({"criterion": "act"}, False),
    "magnitude": ({"criterion": "magnitude"}, False),
}
REFERENCE = "dense"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.criteria_probe", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--fixtures", default=",".join(FIXTURES))
    parser.add_argument("--pairs", default=",".join(PAIRS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--batches", type=int, default=4, help="scoring batches")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results-dir", default=DEFAULT_RESULTS_DIR)
    return parser


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, tokens: torch.Tensor) -> float:
    model.eval()
    losses = [
        model(input_ids=tokens[i : i + 8], labels=tokens[i : i + 8]).loss for i in range(0, len(tokens), 8)
    ]
    return float(torch.stack(losses).mean())


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    shared = shared_dir()
    device = torch.device("cpu")
    recorder = Recorder(args.results_dir, "criteria_probe", device)
    done = {(r["provider"], r["shape"]) for r in read_rows(recorder.path) if r["status"] == "ok"}
    for fixture in args.fixtures.split(","):
        model_dir = shared.joinpath(*FIXTURES[fixture])
        tokenizer = load_tokenizer(model_dir)
        for pair in args.pairs.split(","):
            calibration, evals = PAIRS[pair]
            eval_name, eval_path = next(iter(evals.items()))
            calib = windows(tokenize(tokenizer, read_text(shared.joinpath(*calibration))), args.seq_len)
            held_out = windows(tokenize(tokenizer, read_text(shared.joinpath(*eval_path))), args.seq_len)
            held_out = held_out[: args.eval_windows]
            generator = torch.Generator().manual_seed(args.seed)
            batches = calib[torch.randperm(len(calib), generator=generator)[: args.batches * args.batch_size]]
            shape = (
                f"{fixture} calib={pair} eval={eval_name} ratio={args.ratio:g} scoring={args.batches}x"
                f"{args.batch_size}x{args.seq_len} eval_windows={len(held_out)} seed={args.seed}"
            )
            for variant in [REFERENCE, *args.variants.split(",")]:
                if (variant, shape) in done:
                    continue
                model = load_model(model_dir, dtype=torch.float32, device=device)
                if variant != REFERENCE:
                    overrides, rows_only = VARIANTS[variant]
                    pruner = LoraPruner(
                        model, LoraPruneConfig(ratio=args.ratio, lora_dropout=0.0, **overrides)
                    )
                    if rows_only:
                        score = pruner.tracker.member_importance
                        pruner.tracker.member_importance = lambda m, score=score: (
                            None if m.axis == "in" else score(m)
                        )
                    model.train()
                    for index in range(args.batches):
                        batch = batches[index * args.batch_size : (index + 1) * args.batch_size]
                        model(input_ids=batch, labels=batch).loss.backward()
                        pruner.update_scores()
                        model.zero_grad(set_to_none=True)
                    pruner.prune(args.ratio)
                    pruner.finish_scoring()
                loss = held_out_loss(model, held_out)
                print(f"{shape} {variant}: held-out loss {loss:.4f}", flush=True)
                recorder.record(
                    Result(
                        "held_out_loss_after_oneshot_prune",
                        variant,
                        shape,
                        "float32",
                        value=loss,
                        unit="nats/token",
                        reference=REFERENCE,
                        repetitions=1,
                    )
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
