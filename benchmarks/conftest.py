"""Options and fixtures of the kernel micro-benchmarks: ``pytest benchmarks/ --benchmark-only``.

They need a CUDA GPU and are skipped without one; the CPU smoke test of the harness lives in
``tests/test_benchmarks_smoke.py``. Rows go to ``<--results-dir>/kernels.csv``; the table of
this session's rows, floors beside, is printed at the end.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.harness import DEFAULT_RESULTS_DIR, Recorder, results_table

RECORDER = pytest.StashKey[Recorder]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("loraprune benchmarks")
    group.addoption("--quick", action="store_true", default=False, help="the small grid (kernel_cases.QUICK)")
    group.addoption(
        "--results-dir",
        default=str(DEFAULT_RESULTS_DIR),
        help="folder of the results CSVs (default: benchmarks/results)",
    )


@pytest.fixture(scope="session")
def kernel_recorder(request: pytest.FixtureRequest) -> Recorder:
    """The session's recorder of kernels.csv, calibrated once at the start of the run."""
    if not torch.cuda.is_available():
        pytest.skip("the kernel micro-benchmarks need a CUDA GPU")
    recorder = Recorder(Path(request.config.getoption("--results-dir")), "kernels", torch.device("cuda"))
    recorder.calibrate([torch.float16, torch.bfloat16])
    request.config.stash[RECORDER] = recorder
    return recorder


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    recorder = config.stash.get(RECORDER, None)
    if recorder is not None and recorder.rows:
        terminalreporter.section(f"loraprune kernels ({recorder.path})")
        terminalreporter.write_line(results_table(recorder.rows))
