"""llama.cpp on the CPU: prompt processing and generation speed of a dense model and its pruned copies.

Models: a LLaMA of the ``small`` shape (``--layers`` layers of width 1024, 16 heads of 64, MLP
2816, vocab 8192) with random weights, and copies pruned at each of ``--ratios`` by weight
magnitude without training (:func:`benchmarks.models.prune_without_training`: LoRAPrune's layer
choice and global ranking, so layers differ), once with MLP widths free (``round_to=1``) and once
rounded to ``--round-to`` (default 256: what llama.cpp's k-quants need). Speed depends on the
shapes only. Each is exported with ``loraprune export gguf`` to every ``--outtypes`` type
(``q4_k_m``: llama.cpp's own quantizer, as ``loraprune export gguf`` runs it) and timed like
``llama-bench`` (flash attention on): ``pp``: one ``--prompt-len``-token batch from an empty context; ``tg``:
``--new-tokens`` tokens one at a time; tokens/s, median of ``--repeats`` after a warm-up, every
engine at ``--threads`` threads. The same comparison runs in transformers (fp32, PyTorch eager,
no ``torch.compile``; ``pp`` keeps the last position's logits only, ``tg`` is ``generate``).
``ratio_to_reference`` = pruned / dense tokens/s in the same run (above 1: faster). Every round
times each model once, in turn, so that a change of load on a shared machine reaches every model
alike. Beside the speeds, ``weight bytes`` rows give each file's size (GGUF) or parameters' bytes
(transformers) over dense's: the bound on the decode speed-up, which reads every weight per token.

``--models NAME=MODEL,...`` times real models instead, named as the CLI names them (a folder, a
Hub id or a .gguf file); the first is the reference, named ``dense``. Needs llama-cpp-python (the
environment of ``.ci/engine_llamacpp.sh``) and ``$LORAPRUNE_SHARED`` for the fixture's tokenizer:

    python -m benchmarks.engine_llamacpp [--layers 8] [--ratios 0.2,0.5] [--outtypes f16,q8_0,q4_k_m]
    python -m benchmarks.engine_llamacpp --models dense=model.gguf,pruned50=runs/p50 --threads 1,2
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import DEFAULT_RESULTS_DIR, Recorder, Result, read_rows, results_table, shared_dir
from benchmarks.models import parameter_bytes, prune_without_training, random_llama, real_models

STUDY = "engine_llamacpp"
SMALL = {
    "vocab_size": 8192,
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.engine_llamacpp", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--ratios", default="0.2,0.5", help="comma-separated pruning ratios")
    parser.add_argument("--round-to", type=int, default=256, help="MLP widths of the rounded variants")
    parser.add_argument(
        "--outtypes", default="f16,q8_0,q4_k_m", help="GGUF types: f32, f16, bf16, q8_0, q4_k_m (empty: none)"
    )
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", default=str(os.cpu_count()), help="comma-separated thread counts, each timed in turn"
    )
    parser.add_argument(
        "--models",
        help="NAME=MODEL,... real models to time instead of the random ones (the first is the reference)",
    )
    parser.add_argument(
        "--label", help="the rows' shape label with --models (default: the first model's name)"
    )
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument(
        "--transformers-dtypes", default="float32", help="comma-separated dtypes of the transformers rows"
    )
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR)
    return parser


def cpu_name() -> str:
    with open("/proc/cpuinfo") as cpuinfo:
        names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    return names[0] if names else "unknown CPU"


@torch.no_grad()
def write_models(args: argparse.Namespace, root: Path) -> dict[str, Path]:
    """The dense checkpoint and, per ratio, a pruned one with free and with rounded MLP widths."""
    from transformers import LlamaConfig

    config = LlamaConfig(**SMALL, num_hidden_layers=args.layers)
    tokenizer_dir = shared_dir() / "fixtures" / "tiny-llama"  # the same 8192-token vocabulary
    variants = {"dense": (0.0, 1)}
    for ratio in (float(r) for r in args.ratios.split(",")):
        variants[f"pruned{round(100 * ratio)}"] = (ratio, 1)
        variants[f"pruned{round(100 * ratio)}-round{args.round_to}"] = (ratio, args.round_to)
    paths = {}
    for name, (ratio, round_to) in variants.items():
        model = random_llama(config, torch.device("cpu"), torch.float32)
        if ratio:
            model = prune_without_training(model, ratio, uniform=False, round_to=round_to)
        paths[name] = root / name
        model.save_pretrained(paths[name])
        for file in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_dir / file, paths[name] / file)
        del model
        gc.collect()
    return paths


def gguf_file(folder: Path, outtype: str, root: Path) -> tuple[Path, str]:
    """The folder as a GGUF of ``outtype`` (K-quants through llama.cpp's quantizer, as users export
    them), and a note naming what is stored at a fallback type."""
    from loraprune.export import export_gguf

    result = export_gguf(folder, root / f"{folder.name}-{outtype}.gguf", outtype=outtype)
    kinds = sorted(set(result.fallback.values()))
    note = (
        f"{len(result.fallback)} matrices {'/'.join(kinds)} (rows not multiples of {result.block})"
        if result.fallback
        else ""
    )
    return result.path, note


Rates = dict[str, tuple[list[float], list[float]]]  # per model: pp and tg tokens/s of each timed round


def alternate(models: dict[str, object], one_round, repeats: int) -> Rates:
    """``one_round(model) -> (pp, tg)`` for every model in turn, ``repeats`` times after a warm-up round."""
    rates: Rates = {name: ([], []) for name in models}
    for round_ in range(repeats + 1):  # round 0 warms up
        for name, model in models.items():
            pp, tg = one_round(model)
            if round_:
                rates[name][0].append(pp)
                rates[name][1].append(tg)
    return rates


def prompt_ids(args: argparse.Namespace) -> list[int]:
    """The same prompt for every model: ids in every vocabulary benchmarked (at least 8192 tokens)."""
    return torch.randint(3, 8192, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()


def time_llama_cpp(paths: dict[str, Path], args: argparse.Namespace, threads: int) -> Rates:
    import llama_cpp

    llms = {
        name: llama_cpp.Llama(
            str(path),
            n_ctx=args.prompt_len + args.new_tokens + 8,
            n_batch=args.prompt_len,
            n_ubatch=args.prompt_len,
            n_threads=threads,
            n_threads_batch=threads,
            flash_attn=True,  # without it llama.cpp pads every layer's V cache to the widest layer
            verbose=False,
        )
        for name, path in paths.items()
    }
    prompt = prompt_ids(args)

    def one_round(llm) -> tuple[float, float]:
        llm.reset()  # the next eval drops the KV cache from position 0 on
        start = time.perf_counter()
        llm.eval(prompt)
        pp = args.prompt_len / (time.perf_counter() - start)
        llm.reset()
        start = time.perf_counter()
        for token in prompt[: args.new_tokens]:
            llm.eval([token])
        return pp, args.new_tokens / (time.perf_counter() - start)

    try:
        return alternate(llms, one_round, args.repeats)
    finally:
        for llm in llms.values():
            llm.close()


@torch.no_grad()
def time_transformers(folders: dict[str, Path], args: argparse.Namespace, dtype: str, threads: int) -> Rates:
    import loraprune

    torch.set_num_threads(threads)
    models = {name: loraprune.load_model(folder, dtype=dtype).eval() for name, folder in folders.items()}
    prompt = torch.tensor([prompt_ids(args)])

    def one_round(model) -> tuple[float, float]:
        start = time.perf_counter()
        model(input_ids=prompt, logits_to_keep=1, use_cache=False)
        pp = args.prompt_len / (time.perf_counter() - start)
        start = time.perf_counter()
        model.generate(
            prompt[:, :1],
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        return pp, args.new_tokens / (time.perf_counter() - start)

    return alternate(models, one_round, args.repeats)


def record(
    recorder: Recorder,
    engine: str,
    shape: str,
    dtype: str,
    rates: Rates,
    notes: dict[str, str],
    threads: int,
    args: argparse.Namespace,
) -> None:
    load = "load avg {:.1f}/{:.1f}".format(*os.getloadavg()[:2])
    for name, (pp, tg) in rates.items():
        for benchmark, values, count in (("pp", pp, args.prompt_len), ("tg", tg, args.new_tokens)):
            recorder.record(
                Result(
                    f"{engine} {benchmark}{count}",
                    name,
                    shape,
                    dtype,
                    value=statistics.median(values),
                    unit="tok/s",
                    reference="" if name == "dense" else "dense",
                    repetitions=len(values),
                    note="; ".join(
                        p for p in (notes.get(name, ""), f"{threads} threads", load, cpu_name()) if p
                    ),
                )
            )


def record_bytes(recorder: Recorder, engine: str, shape: str, dtype: str, sizes: dict[str, int]) -> None:
    for name, size in sizes.items():
        recorder.record(
            Result(
                f"{engine} weight bytes",
                name,
                shape,
                dtype,
                value=size,
                unit="B",
                reference="" if name == "dense" else "dense",
                note="the GGUF file" if engine == "llama.cpp" else "parameters, tied matrices once",
            )
        )


def plot(path: Path, rows: list[dict[str, str]]) -> Path | None:
    """Speed-up over dense per engine, type and thread count: one panel for pp, one for tg."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed")
        return None
    from benchmarks.plot import _save, grouped_bars

    rows = [
        dict(r, shape=f"{r['benchmark'].split()[0]} {r['dtype']} {r['shape'].split()[-1]}")
        for r in rows
        if r["ratio_to_reference"] and r["unit"] == "tok/s"
    ]
    figure, panels = plt.subplots(1, 2, figsize=(12, 5))
    for axes, kind in zip(panels, ("pp", "tg"), strict=True):
        subset = [r for r in rows if r["benchmark"].split()[1].startswith(kind)]
        grouped_bars(axes, subset, lambda r: float(r["ratio_to_reference"]), "tokens/s over dense")
        axes.axhline(1.0, color="black", linewidth=0.8)
        axes.set_title(subset[0]["benchmark"].split()[1] if subset else kind)
    return _save(figure, path, plt)


def markdown_table(rows: list[dict[str, str]]) -> str:
    """pp and tg tokens/s and speed-ups per engine, type, threads and model, with the weight bytes (for the README)."""
    sizes = {
        (r["benchmark"].split()[0], r["dtype"], r["provider"]): r["ratio_to_reference"]
        for r in rows
        if r["unit"] == "B"
    }
    cells: dict[tuple[str, str, str, str], dict[str, str]] = {}
    for row in rows:
        if row["unit"] != "tok/s":
            continue
        engine, bench = row["benchmark"].split()
        cell = cells.setdefault((engine, row["dtype"], row["shape"].split()[-1], row["provider"]), {})
        ratio = f" ({float(row['ratio_to_reference']):.2f}×)" if row["ratio_to_reference"] else ""
        cell[bench[:2]] = f"{float(row['value']):.1f}{ratio}"
    lines = [
        "| engine | type | threads | model | pp tok/s | tg tok/s | weight bytes |",
        "| --- | --- | --- | --- | ---: | ---: | ---: |",
    ]
    for (engine, dtype, threads, name), cell in cells.items():
        size = sizes.get((engine, dtype, name))
        size = f"{float(size):.2f}×" if size else ("1" if name == "dense" else "")
        lines.append(
            f"| {engine} | {dtype} | {threads.removeprefix('threads=')} | {name} | {cell.get('pp', '')} "
            f"| {cell.get('tg', '')} | {size} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        print("SKIPPED the llama.cpp study: llama-cpp-python is not installed (bash .ci/engine_llamacpp.sh)")
        return 0
    threads = [int(t) for t in args.threads.split(",")]
    recorder = Recorder(args.results_dir, STUDY, torch.device("cpu"))
    version = f"llama-cpp-python {llama_cpp.__version__}, gguf {importlib.metadata.version('gguf')}"
    with (
        tempfile.TemporaryDirectory(prefix="loraprune-llamacpp-bench-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        root = Path(tmp)
        if args.models:
            folders = real_models(args.models, stack)
            label = args.label or args.models.split(",")[0].split("=")[0]
        else:
            folders = write_models(args, root)
            label = f"small L={args.layers}"

        def shape(count: int) -> str:
            return f"{label} pp{args.prompt_len} tg{args.new_tokens} threads={count}"

        for outtype in filter(None, args.outtypes.split(",")):
            files = {name: gguf_file(folder, outtype, root) for name, folder in folders.items()}
            paths = {name: path for name, (path, _) in files.items()}
            notes = {name: f"{version}; {note}".rstrip("; ") for name, (_, note) in files.items()}
            record_bytes(
                recorder, "llama.cpp", label, outtype, {n: p.stat().st_size for n, p in paths.items()}
            )
            for count in threads:
                record(
                    recorder,
                    "llama.cpp",
                    shape(count),
                    outtype,
                    time_llama_cpp(paths, args, count),
                    notes,
                    count,
                    args,
                )
            for path in paths.values():
                path.unlink()
        if not args.skip_transformers:
            for dtype in args.transformers_dtypes.split(","):
                sizes = {name: parameter_bytes(folder, dtype) for name, folder in folders.items()}
                record_bytes(recorder, "transformers", label, dtype, sizes)
                notes = dict.fromkeys(folders, "eager, sdpa")
                for count in threads:
                    rates = time_transformers(folders, args, dtype, count)
                    record(recorder, "transformers", shape(count), dtype, rates, notes, count, args)
    print(results_table(recorder.rows))
    run = recorder.rows[0]["run_id"]
    rows = [r for r in read_rows(recorder.path) if r["run_id"] == run]
    print(markdown_table(rows))
    figure = plot(args.results_dir / f"{STUDY}.png", rows)
    if figure:
        print(figure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
