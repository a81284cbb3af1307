"""llama.cpp on the CPU: prompt processing and generation speed of a dense model and its pruned copies.

Models: a LLaMA of the ``small`` shape (``--layers`` layers of width 1024, 16 heads of 64, MLP
2816, vocab 8192) with random weights, and copies pruned at each of ``--ratios`` by weight
magnitude without training (:func:`benchmarks.models.prune_without_training`: LoRAPrune's layer
choice and global ranking, so layers differ), once with MLP widths free (``round_to=1``) and once
rounded to ``--round-to`` (default 256: what llama.cpp's k-quants need). Speed depends on the
shapes only. Each is exported with ``loraprune export gguf`` to every ``--outtypes`` type
(``q4_k_m``: llama.cpp's own quantizer run on the f16 file, as users do) and timed like
``llama-bench`` (flash attention on): ``pp``: one ``--prompt-len``-token batch from an empty context; ``tg``:
``--new-tokens`` tokens one at a time; tokens/s, median of ``--repeats`` after a warm-up, every
engine at ``--threads`` threads. The same comparison runs in transformers (fp32, PyTorch eager,
no ``torch.compile``; ``pp`` keeps the last position's logits only, ``tg`` is ``generate``).
``ratio_to_reference`` = pruned / dense tokens/s in the same run (above 1: faster). Needs
llama-cpp-python (the environment of ``.ci/engine_llamacpp.sh``) and ``$LORAPRUNE_SHARED`` for
the fixture's tokenizer:

    python -m benchmarks.engine_llamacpp [--layers 8] [--ratios 0.2,0.5] [--outtypes f16,q8_0,q4_k_m]
"""

from __future__ import annotations

import argparse
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
from benchmarks.models import prune_without_training, random_llama

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
        "--outtypes", default="f16,q8_0,q4_k_m", help="GGUF types: f32, f16, bf16, q8_0, q4_k_m"
    )
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--skip-transformers", action="store_true")
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
    """The folder as a GGUF of ``outtype``, and what fell back to another type (a note)."""
    from loraprune.export import export_gguf

    if outtype != "q4_k_m":
        result = export_gguf(folder, root / f"{folder.name}-{outtype}.gguf", outtype=outtype)
        note = (
            f"{len(result.f16_fallback)} matrices f16 (rows not multiples of 32)"
            if result.f16_fallback
            else ""
        )
        return result.path, note
    import llama_cpp

    source, _ = gguf_file(folder, "f16", root)
    out = root / f"{folder.name}-q4_k_m.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = os.cpu_count()
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source} to Q4_K_M")
    return out, "llama.cpp's quantizer on the f16 export"


def time_llama_cpp(path: Path, args: argparse.Namespace) -> tuple[list[float], list[float]]:
    """Prompt-processing and generation tokens/s of each timed round."""
    import llama_cpp

    llm = llama_cpp.Llama(
        str(path),
        n_ctx=args.prompt_len + args.new_tokens + 8,
        n_batch=args.prompt_len,
        n_ubatch=args.prompt_len,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        flash_attn=True,  # without it llama.cpp pads every layer's V cache to the widest layer
        verbose=False,
    )
    prompt = torch.randint(3, 8192, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    pp, tg = [], []
    for round_ in range(args.repeats + 1):  # round 0 warms up
        llm.reset()  # the next eval drops the KV cache from position 0 on
        start = time.perf_counter()
        llm.eval(prompt)
        pp_rate = args.prompt_len / (time.perf_counter() - start)
        llm.reset()
        start = time.perf_counter()
        for token in prompt[: args.new_tokens]:
            llm.eval([token])
        tg_rate = args.new_tokens / (time.perf_counter() - start)
        if round_:
            pp.append(pp_rate)
            tg.append(tg_rate)
    llm.close()
    return pp, tg


@torch.no_grad()
def time_transformers(folder: Path, args: argparse.Namespace) -> tuple[list[float], list[float]]:
    import loraprune

    model = loraprune.load_model(folder, dtype="float32").eval()
    prompt = torch.randint(3, 8192, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    pp, tg = [], []
    for round_ in range(args.repeats + 1):
        start = time.perf_counter()
        model(input_ids=prompt, logits_to_keep=1, use_cache=False)
        pp_rate = args.prompt_len / (time.perf_counter() - start)
        start = time.perf_counter()
        model.generate(
            prompt[:, :1],
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        tg_rate = args.new_tokens / (time.perf_counter() - start)
        if round_:
            pp.append(pp_rate)
            tg.append(tg_rate)
    return pp, tg


def record(
    recorder: Recorder, engine: str, name: str, shape: str, dtype: str, rates, note: str, args
) -> None:
    load = "load avg {:.1f}/{:.1f}".format(*os.getloadavg()[:2])
    for benchmark, values, count in (("pp", rates[0], args.prompt_len), ("tg", rates[1], args.new_tokens)):
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
                note="; ".join(p for p in (note, f"{args.threads} threads", load, cpu_name()) if p),
            )
        )


def plot(path: Path, rows: list[dict[str, str]]) -> Path | None:
    """Speed-up over dense per engine and type: one panel for pp, one for tg."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed")
        return None
    from benchmarks.plot import _save, grouped_bars

    rows = [
        dict(r, shape=r["benchmark"].split()[0] + " " + r["dtype"]) for r in rows if r["ratio_to_reference"]
    ]
    figure, panels = plt.subplots(1, 2, figsize=(12, 5))
    for axes, kind in zip(panels, ("pp", "tg"), strict=True):
        subset = [r for r in rows if r["benchmark"].split()[1].startswith(kind)]
        grouped_bars(axes, subset, lambda r: float(r["ratio_to_reference"]), "tokens/s over dense")
        axes.axhline(1.0, color="black", linewidth=0.8)
        axes.set_title(subset[0]["benchmark"].split()[1] if subset else kind)
    return _save(figure, path, plt)


def markdown_table(rows: list[dict[str, str]]) -> str:
    """pp and tg tokens/s and speed-ups per engine, type and variant (for the README)."""
    cells: dict[tuple[str, str, str], dict[str, str]] = {}
    for row in rows:
        engine, bench = row["benchmark"].split()
        cell = cells.setdefault((engine, row["dtype"], row["provider"]), {})
        ratio = f" ({float(row['ratio_to_reference']):.2f}x)" if row["ratio_to_reference"] else ""
        cell[bench[:2]] = f"{float(row['value']):.1f}{ratio}"
    lines = ["| engine | type | model | pp tok/s | tg tok/s |", "| --- | --- | --- | ---: | ---: |"]
    for (engine, dtype, name), cell in cells.items():
        lines.append(f"| {engine} | {dtype} | {name} | {cell.get('pp', '')} | {cell.get('tg', '')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        print("SKIPPED the llama.cpp study: llama-cpp-python is not installed (bash .ci/engine_llamacpp.sh)")
        return 0
    torch.set_num_threads(args.threads)
    recorder = Recorder(args.results_dir, STUDY, torch.device("cpu"))
    shape = f"small L={args.layers} pp{args.prompt_len} tg{args.new_tokens}"
    version = f"llama-cpp-python {llama_cpp.__version__}, gguf {importlib.metadata.version('gguf')}"
    with tempfile.TemporaryDirectory(prefix="loraprune-llamacpp-bench-") as tmp:
        root = Path(tmp)
        folders = write_models(args, root)
        for outtype in args.outtypes.split(","):
            for name, folder in folders.items():
                path, note = gguf_file(folder, outtype, root)
                rates = time_llama_cpp(path, args)
                record(
                    recorder,
                    "llama.cpp",
                    name,
                    shape,
                    outtype,
                    rates,
                    f"{version}; {note}".rstrip("; "),
                    args,
                )
                path.unlink()
        if not args.skip_transformers:
            for name, folder in folders.items():
                rates = time_transformers(folder, args)
                record(recorder, "transformers", name, shape, "float32", rates, "eager, sdpa", args)
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
