"""``loraprune`` command line: ``prune``, ``eval``, ``info`` and ``export`` (arguments in :mod:`loraprune.cli_args`).

Bad input (missing paths, a data file too short for one window, a ratio outside [0, 1), too
few steps, an unsupported architecture, CUDA without a GPU) gives one error line naming the
argument and exit code 2, before anything is written to the output directory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from loraprune.cli_args import EXIT_USAGE, build_parser

EXIT_INTERRUPTED = 130
CHECKPOINT_NAME = "checkpoint.safetensors"
REPORT_NAME = "prune_report.json"


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a flag argparse rejected (already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if getattr(args, "quiet", False):
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    handlers = {"prune": cmd_prune, "eval": cmd_eval, "info": cmd_info, "export": cmd_export}
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt as exc:
        print(f"loraprune: {exc or 'interrupted'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (CliError, ValueError, TypeError, OSError, ImportError) as exc:
        print(f"loraprune {args.command}: error: {_flagify(str(exc), parser, args.command)}", file=sys.stderr)
        return EXIT_USAGE


def _flagify(message: str, parser: argparse.ArgumentParser, command: str) -> str:
    """Name command-line flags, not Python fields: ``prune_every`` becomes ``--prune-every``.

    Snake-case names are replaced anywhere; one-word names (``steps``) only where the message,
    a parenthesis or a ``;``-separated item starts with them, so that ordinary words stay words.
    """
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    nested = [  # export's formats (export gguf --outtype)
        action
        for group in sub._actions
        if isinstance(group, argparse._SubParsersAction)
        for format_parser in group.choices.values()
        for action in format_parser._actions
    ]
    for action in sub._actions + nested:
        if action.option_strings and action.dest != "help":
            flag = max(action.option_strings, key=len)
            pattern = (
                rf"(?<![\w-]){re.escape(action.dest)}\b"
                if "_" in action.dest
                else rf"(?:^|(?<=\()|(?<=; )){action.dest}\b"
            )
            message = re.sub(pattern, flag, message)
    return re.sub(r"(?<![\w-])model_dir\b", "MODEL", message)


def _device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    from loraprune.io import parse_device, parse_dtype

    device = parse_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"), "--device")
    dtype = parse_dtype(args.dtype or ("bfloat16" if device.type == "cuda" else "float32"), "--dtype")
    if dtype == torch.float16 and device.type == "cpu":
        raise CliError("--dtype float16 needs --device cuda (use float32 or bfloat16 on the CPU)")
    return device, dtype


def _resolve(args: argparse.Namespace):
    """MODEL as a folder, a Hub snapshot or a GGUF file (checked; a Hub id is fetched if not cached)."""
    from loraprune.sources import resolve_model

    return resolve_model(args.model_dir, args.revision)


def _load(
    source,
    device: torch.device,
    dtype: torch.dtype,
    quantize_base: str | None = None,
    device_map: str | dict | None = None,
):
    from loraprune.io import load_model, load_tokenizer
    from loraprune.sources import load_gguf, model_folder

    if source.kind == "gguf" and quantize_base is None:
        model, tokenizer = load_gguf(source.path, dtype)
        return model.to(device), tokenizer
    with model_folder(source, dtype) as model_dir:  # a GGUF file is quantized from a dequantized folder
        tokenizer = load_tokenizer(model_dir)
        if tokenizer is None:
            raise CliError(f"MODEL: {source.name} has no tokenizer (save one with the model)")
        if device_map is not None:
            from loraprune.device_map import load_dispatched_model

            model = load_dispatched_model(model_dir, device_map, dtype=dtype, quantize_base=quantize_base)
            return model, tokenizer
        if quantize_base is None:
            return load_model(model_dir, dtype=dtype, device=device), tokenizer
        from loraprune.quantization import load_quantized_model

        return load_quantized_model(model_dir, quantize_base, dtype=dtype, device=device), tokenizer


def _prepare_out_dir(args: argparse.Namespace) -> Path:
    """Check OUT_DIR against --resume/--overwrite without writing anything."""
    out = Path(args.out)
    checkpoint = out / CHECKPOINT_NAME
    if out.exists() and not out.is_dir():
        raise CliError(f"--out: {out} exists and is not a directory")
    if args.resume:
        if not checkpoint.is_file():
            raise CliError(f"--resume: {checkpoint} does not exist (nothing to resume)")
    elif out.exists() and any(out.iterdir()) and not args.overwrite:
        raise CliError(
            f"--out: {out} exists and is not empty; pass --overwrite to write into it or --resume "
            "to continue its run"
        )
    return out


def cmd_prune(args: argparse.Namespace) -> int:
    from loraprune.config import LoraPruneConfig
    from loraprune.data import read_text, tokenize, windows
    from loraprune.lorashear import ALL_LAYERS, method_options
    from loraprune.run import PruningRun, RunConfig

    out = _prepare_out_dir(args)
    device, dtype = _device_and_dtype(args)
    data_parallel = _join_data_parallel(args, device)
    if data_parallel is not None and device.type == "cuda":
        device = torch.device("cuda", data_parallel.local_rank)
    source = _resolve(args)
    device_map = _device_map(args, data_parallel, source)
    method = method_options(
        args.method,
        protect_fraction=args.protect_fraction,
        fade_steps=args.fade_steps,
        layers=args.layers,
        prune_every=args.prune_every,
    )
    prune_config = LoraPruneConfig(
        ratio=args.ratio,
        criterion=args.criterion,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        lora_final_r=args.lora_final_r,
        lora_alpha_mode=args.lora_alpha_mode,
        rank_prune_every=args.rank_prune_every,
        rank_prune_count=args.rank_prune_count,
        gqa_unit=args.gqa_unit,
        layers=None if method["layers"] == ALL_LAYERS else method["layers"],
        ranking=args.ranking,
        round_to=args.round_to,
        ema_decay=args.ema_decay,
        taylor_impl=args.taylor_impl,
        squared=args.squared,
        lora_members=args.lora_members,
        seed=args.seed,
        quantize_base=args.quantize_base,
    )
    run_config = RunConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        seq_len=args.seq_len,
        lr=args.lr,
        max_grad_norm=args.max_grad_norm,
        prune_every=args.prune_every,
        warmup=args.warmup,
        cooldown=args.cooldown,
        mode=args.mode,
        calib_batches=args.calib_batches,
        calib_seq_len=args.calib_seq_len,
        save_every=args.save_every,
        distill_weight=args.distill_weight,
        distill_temperature=args.distill_temperature,
        reconstruct=args.reconstruct,
        reconstruct_lambda=args.reconstruct_lambda,
        reconstruct_samples=args.reconstruct_samples,
        protect_fraction=method["protect_fraction"],
        protect_by=args.protect_by,
        heldout_windows=args.heldout_windows,
        fade_steps=method["fade_steps"],
        fade_epsilon=args.fade_epsilon,
        recovery_stages=args.recovery_stages,
        recovery_rule=args.recovery_rule,
    )
    for path in args.eval_data:
        if not Path(path).exists():
            raise CliError(f"--eval-data: {path} does not exist")
    _check_recovery_data(args)
    model, tokenizer = _load(source, device, dtype, args.quantize_base, device_map)
    if method["layers"] == ALL_LAYERS:
        from dataclasses import replace

        from loraprune.structures import decoder_layers

        prune_config = replace(prune_config, layers=tuple(range(len(decoder_layers(model)))))
    token_windows = windows(tokenize(tokenizer, read_text(args.data, "--data")), args.seq_len, "--data")
    recovery_sources = {
        path: windows(
            tokenize(tokenizer, read_text(path, "--recovery-data")), args.seq_len, "--recovery-data"
        )
        for path in args.recovery_data
    }
    amp_dtype = dtype if device.type == "cuda" and dtype != torch.float32 else None
    run_class = PruningRun
    if data_parallel is not None:
        from loraprune.distributed import DistributedPruningRun as run_class
    run = run_class(
        model,
        token_windows,
        prune_config,
        run_config,
        seed=args.seed,
        amp_dtype=amp_dtype,
        checkpoint=out / CHECKPOINT_NAME,
        progress=not args.quiet,
        recovery_sources=recovery_sources or None,
        data_name=str(args.data),
    )
    run_config = run.run_config  # the automatic refit and distillation decided for this model and data
    dense_parameters, _ = run.pruner.parameter_counts()
    for note in run.pruner.unreachable_ratio_notes():
        print(f"loraprune prune: warning: --{note}", file=sys.stderr)
    for note in run.notes:
        print(f"loraprune prune: note: {note}", file=sys.stderr)
    if not args.resume:
        run.prepare()  # LoRAShear's protection: a protect_fraction the ratio cannot reach fails here
    out.mkdir(parents=True, exist_ok=True)  # everything is validated: OUT_DIR may be written from here on
    if args.resume:
        run.load_checkpoint()
        _say(args, f"resuming at step {run.step} of {run_config.steps}")
    summary = run.run(stop_after=args.stop_after)
    if not summary.finished:
        _say(args, f"stopped after step {summary.steps_done}; continue with --resume")
        return 0
    if data_parallel is not None and not data_parallel.is_main:
        return 0  # rank 0 compacts and writes the model and the report
    status = run.pruner.status()
    lora_rank = _rank_report(run, summary)
    started = time.perf_counter()
    pruned = run.compact()
    compact_seconds = time.perf_counter() - started  # with --reconstruct, mostly the refit
    pruned.save_pretrained(out)
    tokenizer.save_pretrained(out)
    evaluations = [
        _perplexity(pruned, tokenizer, path, args.eval_seq_len, args.eval_max_windows, 8, args.quiet)
        for path in args.eval_data
    ]
    report = _prune_report(
        args, prune_config, run_config, pruned, status, dense_parameters, summary, evaluations, device, dtype
    )
    report["masked_fractions"] = run.pruner.masked_fractions()  # the ratio reached, per kind of unit
    report["method"] = args.method
    report.update(run.method_report())  # LoRAShear's parts: protect, fade, recovery
    report["processes"] = 1 if data_parallel is None else data_parallel.world_size
    report["model_source"] = source.to_dict()
    if lora_rank is not None:
        report["lora_rank"] = lora_rank
    if run.reconstruction:
        report["reconstruct"] = {
            "wall_time_s": compact_seconds,
            "consumers": [asdict(refit) for refit in run.reconstruction],
        }
    from loraprune.io import atomic_write_text

    atomic_write_text(out / REPORT_NAME, json.dumps(report, indent=2) + "\n")
    (out / CHECKPOINT_NAME).unlink(missing_ok=True)
    after = report["parameters"]
    _say(
        args,
        f"pruned {args.model_dir} -> {out}: {after['before']:,} -> {after['after']:,} parameters "
        f"({after['after'] / after['before']:.1%}), final loss {summary.final_loss:.4f}",
    )
    for evaluation in evaluations:
        _say(args, f"perplexity {evaluation['perplexity']:.3f} on {evaluation['dataset']}")
    return 0


def _check_recovery_data(args: argparse.Namespace) -> None:
    """``--recovery-data``: every source exists and is given once (before the model is loaded)."""
    from loraprune.data import HF_DATASET_PREFIX

    seen = {str(args.data)}
    for path in args.recovery_data:
        if path in seen:
            raise CliError(f"--recovery-data: {path} is given twice (or is --data)")
        seen.add(path)
        if not path.startswith(HF_DATASET_PREFIX) and not Path(path).exists():
            raise CliError(f"--recovery-data: {path} does not exist")


def _rank_report(run, summary) -> dict | None:
    """With rank pruning: the schedule used and each adapter's rank at the end (before compaction)."""
    if run.rank_schedule is None:
        return None
    return {
        "alpha_mode": run.prune_config.lora_alpha_mode,
        "schedule": run.rank_schedule.to_dict(),
        "ranks": run.pruner.rank.ranks(),
        "peak_memory_after_rank_bytes": summary.peak_memory_after_rank_bytes,
    }


def _device_map(args: argparse.Namespace, data_parallel, source) -> str | dict | None:
    """The checked ``--device-map`` (before anything is loaded or written)."""
    if args.device_map is None:
        return None
    if data_parallel is not None:
        raise CliError("--device-map: one process over several devices cannot also run under torchrun")
    if source.kind == "gguf":
        raise CliError(
            "--device-map: a GGUF MODEL is dequantized in this process's memory, not dispatched from "
            "disk; give the Hugging Face folder or Hub id of the model"
        )
    from loraprune.device_map import parse_device_map

    return parse_device_map(args.device_map, source.path, "--device-map")


def _join_data_parallel(args: argparse.Namespace, device: torch.device):
    """Under ``torchrun`` with several processes, join the process group (only rank 0 talks)."""
    from loraprune.distributed import init_data_parallel, launched_data_parallel

    if not launched_data_parallel():
        return None
    data_parallel = init_data_parallel(device)
    if not data_parallel.is_main:
        args.quiet = True
    return data_parallel


def _perplexity(
    model, tokenizer, data: str, seq_len: int, max_windows: int | None, batch_size: int, quiet: bool
) -> dict:
    from loraprune.evaluate import perplexity

    return perplexity(
        model,
        tokenizer,
        data,
        seq_len=seq_len,
        max_windows=max_windows,
        batch_size=batch_size,
        progress=not quiet,
    ).to_dict()


def _prune_report(
    args, prune_config, run_config, model, status, dense_parameters, summary, evaluations, device, dtype
) -> dict:
    import transformers

    import loraprune

    config = model.config
    layers = []
    for index, entry in enumerate(config.pruned_layers):
        layers.append(
            {
                "layer": index,
                "heads": entry["num_attention_heads"],
                "heads_total": config.num_attention_heads,
                "kv_heads": entry["num_key_value_heads"],
                "kv_heads_total": config.num_key_value_heads,
                "channels": entry["intermediate_size"],
                "channels_total": config.intermediate_size,
                "kept_heads": entry["kept_heads"],
                "kept_kv_heads": entry["kept_kv_heads"],
            }
        )
    after = sum(p.numel() for p in model.parameters())
    return {
        "model": str(args.model_dir),
        "data": str(args.data),
        "criterion": prune_config.criterion,
        "mode": run_config.mode,
        "ratio": prune_config.ratio,
        "steps": summary.steps_done,
        "seed": args.seed,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "prune_config": prune_config.to_dict(),
        "run_config": asdict(run_config),
        "groups": [vars(s) for s in status],
        "layers": layers,
        "parameters": {"before": dense_parameters, "after": after, "ratio": after / dense_parameters},
        "final_loss": summary.final_loss,
        "tokens_seen": summary.tokens_seen,
        "wall_time_s": summary.wall_time_s,
        "peak_memory_bytes": summary.peak_memory_bytes,
        "peak_memory_kind": summary.peak_memory_kind,
        "skipped_score_updates": summary.skipped_score_updates,
        "eval": evaluations,
        "versions": {
            "loraprune": loraprune.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def cmd_eval(args: argparse.Namespace) -> int:
    from loraprune.data import read_text

    device, dtype = _device_and_dtype(args)
    read_text(args.data, "--data")  # fail on a bad path before loading the model
    model, tokenizer = _load(_resolve(args), device, dtype)
    result = _perplexity(
        model, tokenizer, args.data, args.seq_len, args.max_windows, args.batch_size, args.quiet
    )
    result["model"] = str(args.model_dir)
    if args.tasks:
        from loraprune.evaluate import lm_eval_tasks

        result["tasks"] = lm_eval_tasks(model, tokenizer, args.tasks.split(","), batch_size=args.batch_size)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"perplexity {result['perplexity']:.3f}  ({result['dataset']}: seq_len {result['seq_len']}, "
            f"{result['windows']} windows, {result['tokens']} tokens, {result['dtype']})"
        )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    from loraprune.fused import split_fused
    from loraprune.sources import gguf_config
    from loraprune.structures import layer_shape

    source = _resolve(args)
    config = gguf_config(source.path) if source.kind == "gguf" else AutoConfig.from_pretrained(source.path)
    with torch.device("meta"):  # shapes and counts only: no weights are read
        model = AutoModelForCausalLM.from_config(config)
    split_fused(model)  # a family's fused matrices (Phi-3's qkv_proj) as the projections counted below
    rows = []
    for index, layer in enumerate(model.model.layers):
        shape = layer_shape(model, index)
        rows.append(
            {
                "layer": index,
                "heads": shape.num_heads,
                "kv_heads": shape.num_kv_heads,
                "channels": shape.intermediate_size,
                "parameters": sum(p.numel() for p in layer.parameters()),
            }
        )
    total = sum(p.numel() for p in model.parameters())
    from loraprune.ops._dispatch import backend_report

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    backends = backend_report(device)  # why a backend would be passed over on this machine
    if args.json:
        print(
            json.dumps(
                {
                    "model": source.name,
                    "source": source.to_dict(),
                    "model_type": config.model_type,
                    "parameters": total,
                    "layers": rows,
                    "backends": {"device": str(device), **backends},
                }
            )
        )
        return 0
    print(f"{source.name}  ({config.model_type}, head_dim {shape.head_dim}, {total:,} parameters)")
    print(f"{'layer':>5} {'heads':>6} {'kv':>4} {'channels':>9} {'parameters':>12}")
    for row in rows:
        print(
            f"{row['layer']:>5} {row['heads']:>6} {row['kv_heads']:>4} {row['channels']:>9} {row['parameters']:>12,}"
        )
    for name, status in backends.items():
        print(f"backend {name} on {device}: {status}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from loraprune.export import export_gguf
    from loraprune.export.gguf import check_out
    from loraprune.sources import model_folder

    check_out(args.out, args.outtype, args.overwrite)  # before a GGUF MODEL is dequantized
    source = _resolve(args)
    with model_folder(source, "float32") as model_dir:
        result = export_gguf(
            model_dir, args.out, outtype=args.outtype, overwrite=args.overwrite, name=source.label
        )
    if result.note:
        print(f"loraprune export: {result.note}", file=sys.stderr)
    print(f"wrote {result.path} ({result.outtype}, {result.tensors} tensors)")
    if result.fallback:
        hint = (
            f"; prune with --round-to {result.block} to keep MLP widths multiples of it"
            if any(name.endswith("ffn_down.weight") for name in result.fallback)
            else ""
        )
        stored = ", ".join(f"{name} ({kind})" for name, kind in result.fallback.items())
        print(
            f"{len(result.fallback)} matrices stored at a type of smaller blocks than {result.outtype}'s, "
            f"so bigger and slower: their rows are not multiples of {result.block}{hint}: {stored}",
            file=sys.stderr,
        )
    return 0


def _say(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
