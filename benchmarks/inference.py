"""Study 3: inference latency of dense and compacted LLaMA-7B-shaped models (random weights, fp16).

Variants: the dense model, and compacted models at 20 % and 50 % of heads and MLP channels
removed, uniform (every layer the same) or non-uniform (LoRAPrune's layer choice and global
ranking: widths differ per layer), with and without ``round_to=64``. Masks come from weight
magnitudes with no training (:func:`benchmarks.models.prune_without_training`): latency
depends on the shapes only.

- ``prefill``: the Hugging Face forward (no ``torch.compile``) of one 2048-token sequence,
  logits of the last position only.
- ``decode``: one greedy token step at batch 1 and 16, prompt 128 tokens, through
  :class:`benchmarks.models.StaticDecoder` (preallocated per-layer caches, one CUDA graph per
  step), timed over 128 consecutive steps; its prefill logits are checked against Hugging Face's.

Ratios are against the dense model in the same run (speed-up = 1 / ratio_to_reference).

    python -m benchmarks.inference [--quick] [--layers N] [--variants NAME,...]
"""

from __future__ import annotations

import argparse
import gc
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.harness import (
    DEFAULT_RESULTS_DIR,
    Recorder,
    Result,
    require_cuda,
    results_table,
    time_calls,
)
from benchmarks.kernel_cases import relative_error
from benchmarks.models import (
    StaticDecoder,
    attention_flops,
    attention_widths,
    causal_context,
    decode_context,
    kv_widths,
    llama7b_config,
    projection_parameters,
    prune_without_training,
    random_llama,
)

DTYPE = torch.float16
REFERENCE = "dense"
DECODE_TOLERANCE = 2e-2  # relative error of the decoder's prefill logits against Hugging Face's (fp16)


@dataclass(frozen=True)
class Variant:
    ratio: float
    uniform: bool = True
    round_to: int = 1

    @property
    def name(self) -> str:
        if not self.ratio:
            return "dense"
        layout = "uniform" if self.uniform else "nonuniform"
        rounding = f"-round{self.round_to}" if self.round_to > 1 else ""
        return f"pruned{round(100 * self.ratio)}-{layout}{rounding}"


FULL_VARIANTS = (
    Variant(0.0),
    *(Variant(r, u, t) for r in (0.2, 0.5) for u in (True, False) for t in (1, 64)),
)
QUICK_VARIANTS = (
    Variant(0.0),
    Variant(0.2, True, 64),
    Variant(0.5, True, 1),
    Variant(0.5, True, 64),
    Variant(0.5, False, 64),
)
VARIANTS = {v.name: v for v in FULL_VARIANTS}


@dataclass(frozen=True)
class Sizes:
    """What the floors of one model need: its projection and head parameters and its widths."""

    projections: int
    head: int
    attention_widths: list[int]
    kv_widths: list[int]

    @classmethod
    def of(cls, model: torch.nn.Module) -> Sizes:
        return cls(
            projection_parameters(model),
            model.lm_head.weight.numel(),
            attention_widths(model),
            kv_widths(model),
        )

    @property
    def weight_bytes(self) -> int:
        return (self.projections + self.head) * DTYPE.itemsize


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.inference", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="8 layers, 5 variants, fewer repetitions")
    parser.add_argument("--layers", type=int, help="decoder layers (default 32, quick 8)")
    parser.add_argument("--variants", help=f"comma-separated subset of {', '.join(VARIANTS)}")
    parser.add_argument("--prefill-tokens", type=int, default=2048)
    parser.add_argument("--batches", default="1,16", help="decode batch sizes")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128, help="decode steps per timed round")
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = require_cuda("the inference latency study")
    if device is None:
        return 0
    layers = args.layers or (8 if args.quick else 32)
    if args.variants:
        unknown = set(args.variants.split(",")) - set(VARIANTS)
        if unknown:
            raise SystemExit(f"--variants: unknown {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
        variants = sorted((VARIANTS[n] for n in args.variants.split(",")), key=lambda v: v.ratio > 0)
    else:
        variants = QUICK_VARIANTS if args.quick else FULL_VARIANTS
    repetitions = 5 if args.quick else 15
    batches = [int(b) for b in args.batches.split(",")]
    recorder = Recorder(args.results_dir, "inference", device)
    recorder.calibrate([DTYPE])
    for variant in variants:
        measure_variant(recorder, variant, layers, args, batches, repetitions)
        gc.collect()
        torch.cuda.empty_cache()
    print(results_table([r for r in recorder.rows if not r["benchmark"].startswith("calibration")]))
    return 0


@torch.no_grad()
def measure_variant(
    recorder: Recorder,
    variant: Variant,
    layers: int,
    args: argparse.Namespace,
    batches: list[int],
    repetitions: int,
) -> None:
    device = recorder.device
    # the same seed for every variant: they all prune the same weights
    model = random_llama(llama7b_config(layers), device, DTYPE)
    if variant.ratio:
        model = prune_without_training(
            model, variant.ratio, uniform=variant.uniform, round_to=variant.round_to
        )
    sizes = Sizes.of(model)
    parameters = sum(p.numel() for p in model.parameters())
    widths = sizes.attention_widths
    note = f"{parameters / 1e9:.2f}B parameters; attention widths {min(widths)}..{max(widths)}"
    shape_prefix = f"llama-7b layers={layers}"
    generator = torch.Generator(device).manual_seed(1)

    length = args.prefill_tokens
    prompt = torch.randint(0, model.config.vocab_size, (1, length), device=device, generator=generator)
    samples = time_calls(
        lambda: model(input_ids=prompt, use_cache=False, logits_to_keep=1), device, repetitions=repetitions
    )
    flops = 2 * (sizes.projections * length + sizes.head) + attention_flops(
        widths, 1, length, causal_context(length)
    )
    floor, basis = recorder.floor(sizes.weight_bytes, flops, DTYPE)
    recorder.record(
        Result(
            "prefill",
            variant.name,
            f"{shape_prefix} B=1 T={length}",
            "float16",
            value=statistics.median(samples) * 1e3,
            unit="ms",
            floor=floor,
            floor_basis=basis,
            reference=REFERENCE,
            repetitions=repetitions,
            note=f"{note}; Hugging Face forward, {model.config._attn_implementation} attention",
        )
    )
    for batch in batches:
        measure_decode(
            recorder, model, sizes, variant, batch, args, repetitions, generator, shape_prefix, note
        )


def measure_decode(
    recorder: Recorder,
    model: torch.nn.Module,
    sizes: Sizes,
    variant: Variant,
    batch: int,
    args: argparse.Namespace,
    repetitions: int,
    generator: torch.Generator,
    shape_prefix: str,
    note: str,
) -> None:
    device = recorder.device
    base = {
        "benchmark": "decode",
        "provider": variant.name,
        "shape": f"{shape_prefix} B={batch} context={args.prompt_tokens}+{args.new_tokens}",
        "dtype": "float16",
        "reference": REFERENCE,
    }
    prompt = torch.randint(
        0, model.config.vocab_size, (batch, args.prompt_tokens), device=device, generator=generator
    )
    decoder = StaticDecoder(model, batch, decode_context(args.prompt_tokens, args.new_tokens))
    expected = model(input_ids=prompt, use_cache=False, logits_to_keep=1).logits[:, -1]
    error = relative_error(decoder.prefill(prompt), expected)
    if not error <= DECODE_TOLERANCE:
        recorder.record(Result(**base, status="wrong", note=f"prefill logits rel. error {error:.1e}"))
        return
    decoder.capture()
    samples = time_calls(
        decoder.step,
        device,
        repetitions=repetitions,
        warmup=1,
        iterations=args.new_tokens,
        before_round=lambda: decoder.position.fill_(args.prompt_tokens),
    )
    step_ms = statistics.median(samples) * 1e3
    context = args.prompt_tokens + args.new_tokens / 2  # mean visible keys over the timed steps
    cache_bytes = sum(2 * batch * width * context * DTYPE.itemsize for width in sizes.kv_widths)
    flops = 2 * (sizes.projections + sizes.head) * batch + attention_flops(
        sizes.attention_widths, batch, 1, context
    )
    floor, basis = recorder.floor(sizes.weight_bytes + cache_bytes, flops, DTYPE)
    recorder.record(
        Result(
            **base,
            value=step_ms,
            unit="ms",
            floor=floor,
            floor_basis=basis,
            repetitions=repetitions * args.new_tokens,
            note=f"{batch * 1e3 / step_ms:.0f} tokens/s; {note}; CUDA graph per step, rel. error {error:.1e}",
        )
    )


if __name__ == "__main__":
    raise SystemExit(main())
