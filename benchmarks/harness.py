"""What every study shares: result rows and their CSV files, clocks, calibration and floors.

A study opens a :class:`Recorder` on ``<results-dir>/<study>.csv``; the recorder measures the
device's two ceilings first (:meth:`Recorder.calibrate`: a large device-to-device copy and a
large matrix product) so that every later row can carry its physical floor, computed from the
bytes and FLOPs the case must move and do, in the same run on the same device. Rows are
appended as soon as they are measured, so an interrupted run keeps what it finished.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import importlib.metadata
import math
import os
import re
import socket
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
RUN_ID_ENV = "LORAPRUNE_BENCH_RUN_ID"  # set by run_all so that every study of one run shares an id
SHARED_ENV = "LORAPRUNE_SHARED"

SCHEMA = (
    "run_id",
    "date",
    "study",
    "benchmark",
    "provider",
    "shape",
    "dtype",
    "device",
    "package_version",
    "software",
    "status",
    "value",
    "unit",
    "floor",
    "floor_basis",
    "ratio_to_floor",
    "reference",
    "ratio_to_reference",
    "repetitions",
    "note",
)
STATUSES = ("ok", "missing", "wrong", "error", "skipped")

MIB = 2**20
GIB = 2**30
DEFAULT_L2_BYTES = 50 * 10**6  # H100 SXM; used when torch does not report the L2 size


def shared_dir() -> Path:
    """The shared data and fixtures folder: ``$LORAPRUNE_SHARED``, else ``../shared`` beside the repo."""
    return Path(os.environ.get(SHARED_ENV, REPO_ROOT.parent / "shared")).resolve()


_RUN_ID: str | None = None


def run_id() -> str:
    """This run's id: ``$LORAPRUNE_BENCH_RUN_ID`` when a driver set one, else a fresh one (cached)."""
    global _RUN_ID
    if _RUN_ID is None:
        _RUN_ID = os.environ.get(RUN_ID_ENV) or new_run_id()
    return _RUN_ID


def new_run_id() -> str:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{socket.gethostname()[:12]}-{os.getpid()}"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


def software_versions() -> str:
    parts = [f"torch {torch.__version__}"]
    for package in ("triton", "transformers", "peft"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            parts.append(f"{package} {importlib.metadata.version(package)}")
    return "; ".join(parts)


def package_version() -> str:
    import loraprune

    return loraprune.__version__


def l2_cache_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return DEFAULT_L2_BYTES
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) or DEFAULT_L2_BYTES


def require_cuda(what: str) -> torch.device | None:
    """The CUDA device, or ``None`` after printing why ``what`` is skipped on this machine."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    print(
        f"SKIPPED {what}: it needs a CUDA GPU and torch sees none on this machine ({device_name(torch.device('cpu'))})."
    )
    return None


# --- clocks and repetition ---------------------------------------------------------------------

_timeline_event: torch.cuda.Event | None = None
_timeline_seconds = 0.0


def cuda_event_clock() -> float:
    """Seconds on the current CUDA stream's own timeline, read through events.

    Each call records an event, waits for it and adds its distance from the previous event, so
    the difference of two readings is the device time between them (work queued in between
    included, host-side gaps before the first launch too). Consecutive distances are short,
    which keeps the float32 resolution of ``Event.elapsed_time`` at the microsecond level. It is
    also the timer of the pytest-benchmark micro-benchmarks (``pytest.mark.benchmark(timer=...)``).
    """
    global _timeline_event, _timeline_seconds
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    event.synchronize()
    if _timeline_event is not None:
        _timeline_seconds += _timeline_event.elapsed_time(event) / 1e3
    _timeline_event = event
    return _timeline_seconds


def clock_for(device: torch.device) -> Callable[[], float]:
    return cuda_event_clock if device.type == "cuda" else time.perf_counter


def time_calls(
    call: Callable[[], object],
    device: torch.device,
    *,
    repetitions: int,
    warmup: int = 3,
    iterations: int = 1,
    before_round: Callable[[], object] | None = None,
) -> list[float]:
    """Seconds per call of ``repetitions`` timed rounds of ``iterations`` back-to-back calls.

    ``warmup`` untimed rounds come first; ``before_round`` (untimed) runs before every round.
    """
    clock = clock_for(device)
    samples = []
    for index in range(warmup + repetitions):
        if before_round is not None:
            before_round()
        start = clock()
        for _ in range(iterations):
            call()
        elapsed = clock() - start
        if index >= warmup:
            samples.append(elapsed / iterations)
    return samples


def iterations_for(seconds_per_call: float, round_seconds: float = 2e-3, cap: int = 100) -> int:
    """Calls per timed round so that a round lasts about ``round_seconds`` (amortises the clock read)."""
    return max(1, min(cap, math.ceil(round_seconds / max(seconds_per_call, 1e-9))))


def peak_memory_bytes(call: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by ``call`` beyond what was allocated before it (CUDA only)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    result = call()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - baseline
    del result
    return peak


def proc_status_bytes(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (Linux), in bytes."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} (the CPU measurement needs Linux)")
    return int(match.group(1)) * 1024


def step_memory_bytes(step: Callable[[], object], device: torch.device) -> tuple[int, int]:
    """``(resident, peak)``: what is held just before one call of ``step`` and the peak during it.
    CUDA: allocated bytes and ``max_memory_allocated``. CPU (no allocator statistics): ``VmRSS``
    and ``VmHWM``, reset to the current resident set through ``/proc/self/clear_refs`` first."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        resident = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return resident, torch.cuda.max_memory_allocated(device)
    resident = proc_status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    step()
    return resident, proc_status_bytes("VmHWM")


# --- calibration and floors --------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """The device's measured ceilings: copy bandwidth (bytes read + written per second) and matmul rates."""

    copy_bytes_per_second: float
    matmul_flops_per_second: dict[torch.dtype, float]

    def floor_seconds(self, bytes_moved: float, flops: float, dtype: torch.dtype) -> tuple[float, str]:
        """The larger of the memory and the compute time, and which one it is."""
        memory = bytes_moved / self.copy_bytes_per_second
        compute = flops / self.matmul_flops_per_second[dtype]
        return (memory, "memory") if memory >= compute else (compute, "compute")


def measure_calibration(
    device: torch.device, dtypes: Sequence[torch.dtype]
) -> tuple[Calibration, list[tuple[str, str, torch.dtype | None, float, str]]]:
    """Measure the copy bandwidth and the matmul rate of each dtype on ``device``.

    Returns the calibration and its rows as (benchmark, shape, dtype, value, unit). On a GPU: a
    512 MiB device-to-device copy and 8192³ matrix products on random data; on a CPU much
    smaller sizes (the CPU figures only exercise the code path).
    """
    on_gpu = device.type == "cuda"
    repetitions = 20 if on_gpu else 5
    copy_bytes = (512 if on_gpu else 8) * MIB
    bytes_per_second = 2 * copy_bytes / _copy_seconds(copy_bytes, device, repetitions)
    rows = [("calibration_copy", f"{copy_bytes // MIB} MiB", None, bytes_per_second / 1e9, "GB/s")]
    rates = {}
    n = 8192 if on_gpu else 256
    for dtype in dtypes:
        rates[dtype] = 2 * n**3 / _matmul_seconds(n, dtype, device, repetitions)
        rows.append(("calibration_matmul", f"{n}x{n}x{n}", dtype, rates[dtype] / 1e12, "TFLOP/s"))
    return Calibration(bytes_per_second, rates), rows


def _copy_seconds(nbytes: int, device: torch.device, repetitions: int) -> float:
    source = torch.randn(nbytes // 2, device=device, dtype=torch.float16)
    target = torch.empty_like(source)
    return statistics.median(time_calls(lambda: target.copy_(source), device, repetitions=repetitions))


def _matmul_seconds(n: int, dtype: torch.dtype, device: torch.device, repetitions: int) -> float:
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return statistics.median(time_calls(lambda: a @ b, device, repetitions=repetitions))


# --- rows and the CSV ----------------------------------------------------------------------------


@dataclass
class Result:
    """One measurement (or the reason there is none) before the run's metadata is added."""

    benchmark: str
    provider: str
    shape: str
    dtype: str
    status: str = "ok"
    value: float | None = None
    unit: str = ""
    floor: float | None = None
    floor_basis: str = ""
    reference: str = ""
    repetitions: int | None = None
    note: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")


def dtype_name(dtype: torch.dtype | None) -> str:
    return "" if dtype is None else str(dtype).removeprefix("torch.")


def _format(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


@dataclass
class Recorder:
    """Appends result rows of one study to ``results_dir/<study>.csv`` and remembers them for tables.

    ``ratio_to_reference`` is filled from the value the reference provider recorded earlier in
    this run for the same benchmark, shape and dtype (so record the reference first).
    """

    results_dir: Path
    study: str
    device: torch.device
    calibration: Calibration | None = None
    rows: list[dict[str, str]] = field(default_factory=list)
    _values: dict[tuple[str, str, str, str, str], float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.results_dir = Path(self.results_dir)
        self.path = self.results_dir / f"{self.study}.csv"
        self._metadata = {
            "run_id": run_id(),
            "study": self.study,
            "device": device_name(self.device),
            "package_version": package_version(),
            "software": software_versions(),
        }

    def calibrate(self, dtypes: Sequence[torch.dtype]) -> Calibration:
        """Measure the ceilings (see :func:`measure_calibration`) and record them as rows."""
        self.calibration, rows = measure_calibration(self.device, dtypes)
        for benchmark, shape, dtype, value, unit in rows:
            self.record(Result(benchmark, "device", shape, dtype_name(dtype), value=value, unit=unit))
        return self.calibration

    def floor(
        self, bytes_moved: float, flops: float, dtype: torch.dtype, per: float = 1e3
    ) -> tuple[float, str]:
        """The floor in the unit of the measurement (``per`` units per second: 1e3 for ms)."""
        if self.calibration is None:
            raise RuntimeError("Recorder.calibrate() must run before floors are computed")
        seconds, basis = self.calibration.floor_seconds(bytes_moved, flops, dtype)
        return seconds * per, basis

    def remember(self, rows: Iterable[dict[str, str]]) -> None:
        """Make rows of an earlier run (a resumed study) available as references."""
        for row in rows:
            if row["status"] == "ok" and row["value"]:
                key = (row["benchmark"], row["shape"], row["dtype"], row["unit"], row["provider"])
                self._values[key] = float(row["value"])

    def record(self, result: Result) -> dict[str, str]:
        key = (result.benchmark, result.shape, result.dtype, result.unit)
        if result.status == "ok" and result.value is not None:
            self._values[(*key, result.provider)] = result.value
        reference_value = self._values.get((*key, result.reference)) if result.reference else None
        ok = result.status == "ok" and result.value is not None
        row = {
            **self._metadata,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "benchmark": result.benchmark,
            "provider": result.provider,
            "shape": result.shape,
            "dtype": result.dtype,
            "status": result.status,
            "value": _format(result.value),
            "unit": result.unit,
            "floor": _format(result.floor),
            "floor_basis": result.floor_basis,
            "ratio_to_floor": _format(result.value / result.floor if ok and result.floor else None),
            "reference": result.reference,
            "ratio_to_reference": _format(result.value / reference_value if ok and reference_value else None),
            "repetitions": "" if result.repetitions is None else str(result.repetitions),
            "note": result.note,
        }
        append_rows(self.path, [row])
        self.rows.append(row)
        return row


def append_rows(path: Path, rows: Iterable[dict[str, str]]) -> None:
    """Append rows to a results CSV, writing the header first when the file is new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open(newline="") as f:
            header = tuple(next(csv.reader(f), ()))
        if header != SCHEMA:
            raise ValueError(f"{path} has another header than benchmarks.harness.SCHEMA; move it aside")
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SCHEMA)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def format_table(rows: Sequence[dict[str, object]], columns: Sequence[str]) -> str:
    """A plain fixed-width table (numbers as given: format them before)."""
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def short(value: str, digits: int = 3) -> str:
    """A CSV number cell shortened for a printed table."""
    return f"{float(value):.{digits}g}" if value else ""


def results_table(rows: Sequence[dict[str, str]]) -> str:
    """The printed form of result rows: measurement beside its floor and its reference."""
    table = []
    for row in rows:
        table.append(
            {
                "benchmark": row["benchmark"],
                "shape": row["shape"],
                "provider": row["provider"],
                "status": row["status"],
                "value": f"{short(row['value'], 4)} {row['unit']}" if row["value"] else "",
                "floor": f"{short(row['floor'])} ({row['floor_basis']})" if row["floor"] else "",
                "x floor": short(row["ratio_to_floor"]),
                "x ref": f"{short(row['ratio_to_reference'])} vs {row['reference']}"
                if row["ratio_to_reference"]
                else "",
                "note": row["note"] if row["status"] != "ok" else "",
            }
        )
    return format_table(
        table, ["benchmark", "shape", "provider", "status", "value", "floor", "x floor", "x ref", "note"]
    )
