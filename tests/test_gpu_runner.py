"""What a GPU machine runs that this CPU never does: `benchmarks/gpu_session.sh` (its exit status,
its payload), and the suite without the Triton interpreter or without triton at all."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, SHARED

GPU_SESSION = REPO_ROOT / "benchmarks" / "gpu_session.sh"


def write_tool(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_gpu_session_fails_when_the_test_run_fails_and_tests_the_extension(tmp_path):
    # Stand-ins for the GPU machine's tools: the test run fails, everything after it passes.
    tools, out = tmp_path / "bin", tmp_path / "out"
    tools.mkdir()
    seen = tmp_path / "pytest_env"
    write_tool(tools, "nvidia-smi", "echo 'Fake GPU, 1.0'\n")
    write_tool(tools, "compute-sanitizer", "exit 0\n")
    write_tool(
        tools,
        "python3",
        f'case "$*" in *"pytest -q -ra tests"*)\n'
        f'  echo "$LORAPRUNE_EXPECT_CUDA_EXTENSION" > {seen}; exit 1;;\nesac\nexit 0\n',
    )
    env = {**os.environ, "PATH": f"{tools}:{os.environ['PATH']}", "OUT": str(out)}
    result = subprocess.run(
        ["bash", str(GPU_SESSION), "tests"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "exit 1 from: python3 -m pytest -q -ra tests" in result.stdout
    assert seen.read_text().strip() == "1"


def test_gpu_payload_fits_the_device_carry_with_room_to_spare(tmp_path):
    if not (SHARED / "fixtures" / "tiny-llama").is_dir():
        pytest.skip(f"{SHARED} has no fixtures: set LORAPRUNE_SHARED to the shared/ folder")
    dest = tmp_path / "shared"
    env = {**os.environ, "LORAPRUNE_SHARED": str(SHARED), "GPU_PAYLOAD_DIR": str(dest)}
    result = subprocess.run(
        ["bash", str(GPU_SESSION), "prepare"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    assert size <= 48 * 2**20  # the device tool carries 64 MiB at most
    for needed in ("fixtures/tiny-llama/config.json", "data/calib-wikitext103-train-part.txt"):
        assert (dest / needed).is_file()


def run_pytest(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=REPO_ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_tests_that_interpret_triton_on_cpu_tensors_skip_without_the_interpreter():
    # A GPU machine never sets TRITON_INTERPRET; these tests build CPU models and tensors.
    result = run_pytest(
        [
            "tests/test_backends_integration.py::test_triton_backend_runs_the_loop_like_the_reference",
            "tests/test_criteria.py::test_fused_taylor_through_the_triton_masked_linear",
            "tests/test_prunedlora.py::test_triton_ops_agree_with_the_reference_at_every_rank_of_the_schedule",
        ],
        {"TRITON_INTERPRET": "0"},
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert "4 skipped" in result.stdout


def test_every_test_module_collects_without_triton(tmp_path):
    (tmp_path / "triton").mkdir()
    # What a missing package raises (pytest.importorskip skips on it and only on it)
    (tmp_path / "triton" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'triton'\", name='triton')\n"
    )
    pythonpath = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    result = run_pytest(["--collect-only", "tests"], {"PYTHONPATH": pythonpath})
    assert result.returncode == 0, result.stdout[-3000:]
