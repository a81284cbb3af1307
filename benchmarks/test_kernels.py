"""Study 1, the kernel micro-benchmarks: ``pytest benchmarks/ --benchmark-only [--quick]``.

Timed by pytest-benchmark's pedantic mode on the CUDA event clock (median of the rounds, each
round back-to-back calls over input sets rotated beyond the L2 cache), checked against the
float32 reference first, and appended to kernels.csv with the floor of each case.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.harness import Recorder, cuda_event_clock
from benchmarks.kernel_cases import (
    FAST_PATH_PROVIDERS,
    FULL,
    IMPORTANCE_PROVIDERS,
    LINEAR_PROVIDERS,
    PACKED_PROVIDERS,
    QUICK,
    TAYLOR_PROVIDERS,
    FastPathCase,
    Grid,
    ImportanceCase,
    LinearCase,
    PackedImportanceCase,
    TaylorCase,
    fast_path_cases,
    importance_cases,
    linear_cases,
    packed_importance_cases,
    run_case,
    taylor_cases,
)

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel micro-benchmarks need a CUDA GPU"),
    pytest.mark.benchmark(timer=cuda_event_clock, disable_gc=True),
]


def _case_id(value: object) -> str:
    return str(value).replace(" ", "-")


def _grid(config: pytest.Config) -> Grid:
    return QUICK if config.getoption("--quick", default=False) else FULL


@pytest.fixture
def rounds(request: pytest.FixtureRequest) -> int:
    return _grid(request.config).rounds


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    grid = _grid(metafunc.config)
    if metafunc.function is test_lora_importance:
        pairs = [(c, p) for c in importance_cases(grid) for p in IMPORTANCE_PROVIDERS]
    elif metafunc.function is test_lora_importance_packed:
        pairs = [(c, p) for c in packed_importance_cases(grid) for p in PACKED_PROVIDERS]
    elif metafunc.function is test_taylor_importance:
        pairs = [(c, p) for c in taylor_cases(grid) for p in TAYLOR_PROVIDERS]
    elif metafunc.function is test_masked_lora_linear_fast_paths:
        pairs = [(c, p) for c in fast_path_cases(grid) for p in FAST_PATH_PROVIDERS]
    else:
        pairs = [(c, p) for c in linear_cases(grid) for p in LINEAR_PROVIDERS]
    metafunc.parametrize(("case", "provider"), pairs, ids=[f"{_case_id(c)}-{p}" for c, p in pairs])


def _check(row: dict[str, str]) -> None:
    if row["status"] == "missing":
        pytest.skip(row["note"])
    if row["status"] == "wrong":
        pytest.fail(f"{row['provider']} disagrees with the float32 reference: {row['note']}")


def test_lora_importance(
    benchmark, kernel_recorder: Recorder, case: ImportanceCase, provider: str, rounds: int
):
    _check(run_case(benchmark, kernel_recorder, case, provider, rounds))


def test_lora_importance_packed(
    benchmark, kernel_recorder: Recorder, case: PackedImportanceCase, provider: str, rounds: int
):
    _check(run_case(benchmark, kernel_recorder, case, provider, rounds))


def test_masked_lora_linear(
    benchmark, kernel_recorder: Recorder, case: LinearCase, provider: str, rounds: int
):
    _check(run_case(benchmark, kernel_recorder, case, provider, rounds))


def test_taylor_importance(
    benchmark, kernel_recorder: Recorder, case: TaylorCase, provider: str, rounds: int
):
    _check(run_case(benchmark, kernel_recorder, case, provider, rounds))


def test_masked_lora_linear_fast_paths(
    benchmark, kernel_recorder: Recorder, case: FastPathCase, provider: str, rounds: int
):
    _check(run_case(benchmark, kernel_recorder, case, provider, rounds))
