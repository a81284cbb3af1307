"""PNG figures from the results CSVs (matplotlib).

    python -m benchmarks.plot [--results-dir DIR] [--out DIR]

Each figure uses the latest ``ok`` row of every (benchmark, provider, shape, dtype, device), so
a study split over several runs plots whole. Floors are drawn where the rows carry one.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from benchmarks.harness import DEFAULT_RESULTS_DIR, read_rows


def latest_rows(path: Path) -> list[dict[str, str]]:
    """The last ``ok`` row of each (benchmark, provider, shape, dtype, device), calibration left out."""
    latest = {}
    for row in read_rows(path):
        if row["status"] == "ok" and not row["benchmark"].startswith("calibration"):
            latest[(row["benchmark"], row["provider"], row["shape"], row["dtype"], row["device"])] = row
    return list(latest.values())


def grouped_bars(axes, rows: list[dict[str, str]], value, ylabel: str, floor=None, log: bool = False) -> None:
    """One group of bars per shape, one bar per provider; a black tick marks each shape's floor."""
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    width = 0.8 / len(providers)
    by_key = {(r["shape"], r["provider"]): r for r in rows}
    for index, provider in enumerate(providers):
        xs = [i + index * width for i, s in enumerate(shapes) if (s, provider) in by_key]
        ys = [value(by_key[(s, provider)]) for s in shapes if (s, provider) in by_key]
        axes.bar(xs, ys, width, label=provider)
    if floor is not None:
        for i, shape in enumerate(shapes):
            floors = [floor(r) for r in rows if r["shape"] == shape and r["floor"]]
            if floors:
                axes.hlines(floors[0], i - width / 2, i + 0.8 - width / 2, colors="black", linewidth=2)
    axes.set_xticks(
        [i + 0.4 - width / 2 for i in range(len(shapes))], shapes, rotation=60, ha="right", fontsize=7
    )
    axes.set_ylabel(ylabel)
    if log:
        axes.set_yscale("log")
    axes.legend(fontsize=7)


def plot_kernels(rows: list[dict[str, str]], out: Path, plt) -> list[Path]:
    written = []
    for benchmark in dict.fromkeys(r["benchmark"] for r in rows):
        subset = [r for r in rows if r["benchmark"] == benchmark]
        figure, axes = plt.subplots(figsize=(max(6, 0.5 * len({r["shape"] for r in subset})), 5))
        unit = subset[0]["unit"]
        grouped_bars(
            axes,
            subset,
            lambda r: float(r["value"]),
            unit,
            floor=lambda r: float(r["floor"]),
            log=unit == "ms",
        )
        axes.set_title(f"{benchmark} ({subset[0]['device']}); black: floor")
        written.append(_save(figure, out / f"kernels_{benchmark}.png", plt))
    return written


def plot_values(rows: list[dict[str, str]], out: Path, name: str, plt, speedup: bool = False) -> list[Path]:
    """One panel per benchmark: values (or speed-ups over the reference) per shape and provider."""
    benchmarks = list(dict.fromkeys(r["benchmark"] for r in rows))
    figure, panels = plt.subplots(1, len(benchmarks), figsize=(6 * len(benchmarks), 5), squeeze=False)
    for axes, benchmark in zip(panels[0], benchmarks, strict=True):
        subset = [r for r in rows if r["benchmark"] == benchmark]
        if speedup:
            subset = [r for r in subset if r["ratio_to_reference"]]
            grouped_bars(
                axes,
                subset,
                lambda r: 1 / float(r["ratio_to_reference"]),
                f"speed-up over {subset[0]['reference']}",
            )
        else:
            grouped_bars(
                axes,
                subset,
                lambda r: float(r["value"]),
                subset[0]["unit"],
                floor=lambda r: float(r["floor"]),
            )
        axes.set_title(benchmark)
    return [_save(figure, out / f"{name}.png", plt)]


def plot_quality(rows: list[dict[str, str]], out: Path, plt) -> list[Path]:
    """Perplexity against the pruning ratio, one line per method, one panel per eval set."""
    benchmarks = list(dict.fromkeys(r["benchmark"] for r in rows))
    figure, panels = plt.subplots(1, len(benchmarks), figsize=(5 * len(benchmarks), 4), squeeze=False)
    for axes, benchmark in zip(panels[0], benchmarks, strict=True):
        subset = [r for r in rows if r["benchmark"] == benchmark]
        dense = [float(r["value"]) for r in subset if r["provider"] == "dense"]
        methods: dict[str, list[tuple[float, float]]] = {}
        for row in subset:
            if row["provider"] != "dense":
                method, ratio = row["provider"].rsplit(" ", 1)
                methods.setdefault(method, []).append((float(ratio.rstrip("%")), float(row["value"])))
        for method, points in methods.items():
            points = sorted(([(0.0, dense[-1])] if dense else []) + points)
            axes.plot(*zip(*points, strict=True), marker="o", label=method)
        axes.set_xlabel("pruned (%)")
        axes.set_ylabel("perplexity")
        axes.set_yscale("log")
        axes.set_title(benchmark.removeprefix("perplexity "), fontsize=9)
        axes.legend(fontsize=7)
    return [_save(figure, out / "quality.png", plt)]


def _save(figure, path: Path, plt) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__.split("\n")[0])
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR)
    parser.add_argument("--out", type=Path, help="where the PNGs go (default: the results dir)")
    args = parser.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("benchmarks.plot needs matplotlib: pip install matplotlib") from None
    out = args.out or args.results_dir
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for study in ("kernels", "pruning", "inference", "quality"):
        rows = latest_rows(args.results_dir / f"{study}.csv")
        if not rows:
            continue
        if study == "kernels":
            written += plot_kernels(rows, out, plt)
        elif study == "quality":
            written += plot_quality(rows, out, plt)
        else:
            written += plot_values(rows, out, study, plt, speedup=study == "inference")
    print("\n".join(str(p) for p in written) or f"no result rows under {args.results_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
