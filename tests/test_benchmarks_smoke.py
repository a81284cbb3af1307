"""Smoke tests of the benchmark suite on the CPU (the benchmarks themselves need a GPU).

One tiny kernel case goes through a PyTorch provider, pytest-benchmark and the CSV writer; and
the inference study's decode loop is checked against Hugging Face on a pruned tiny model, since
its figures mean nothing if it computes something else. No speed is asserted.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tiny_models import random_tokens, tiny_model

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def benchmarks_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT))  # benchmarks/ is not installed: import it from the checkout


def test_kernel_case_on_cpu_writes_a_schema_row(benchmark, tmp_path, benchmarks_importable):
    if benchmark.disabled:
        pytest.skip("pytest-benchmark is disabled (--benchmark-disable)")
    from benchmarks.harness import SCHEMA, Recorder, read_rows
    from benchmarks.kernel_cases import WEIGHT_DTYPE, ImportanceCase, run_case

    recorder = Recorder(tmp_path, "kernels", torch.device("cpu"))
    recorder.calibrate([WEIGHT_DTYPE])
    case = ImportanceCase("tiny", ((48, 64),), rank=4)

    row = run_case(benchmark, recorder, case, "naive", rounds=3)

    rows = read_rows(tmp_path / "kernels.csv")
    assert tuple(rows[0]) == SCHEMA
    assert [r["benchmark"] for r in rows] == ["calibration_copy", "calibration_matmul", "lora_importance"]
    assert rows[-1] == row
    assert (row["provider"], row["shape"], row["status"], row["unit"]) == ("naive", case.shape, "ok", "ms")
    assert row["run_id"] and row["date"] and row["device"].startswith("cpu") and row["package_version"]
    for column in ("value", "floor", "ratio_to_floor", "ratio_to_reference"):
        assert math.isfinite(float(row[column])) and float(row[column]) > 0, column
    assert row["floor_basis"] in ("memory", "compute")
    assert float(row["ratio_to_reference"]) == 1.0  # naive is its own reference


def test_decode_loop_matches_hugging_face_on_a_pruned_model(benchmarks_importable):
    from benchmarks.models import StaticDecoder, attention_widths, prune_without_training

    model = prune_without_training(tiny_model("llama-gqa-tied", layers=4), 0.5, uniform=False)
    assert (
        len(set(attention_widths(model))) > 1
    )  # per-layer head counts differ: HF's static cache cannot hold them
    prompt = random_tokens(batch=2, length=7)
    decoder = StaticDecoder(model, batch=2, max_length=16)

    prefill_logits = decoder.prefill(prompt)
    generated = [decoder.tokens.clone()]
    for _ in range(3):
        decoder.step()  # eager on the CPU; the study replays it as a CUDA graph
        generated.append(decoder.tokens.clone())

    with torch.no_grad():
        torch.testing.assert_close(prefill_logits, model(prompt).logits[:, -1], rtol=1e-4, atol=1e-4)
        logits = model(torch.cat([prompt, *generated[:-1]], dim=1)).logits
    assert torch.equal(torch.cat(generated, dim=1), logits[:, prompt.shape[1] - 1 :].argmax(-1))
    assert int(decoder.position) == prompt.shape[1] + 3
