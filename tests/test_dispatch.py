"""The CUDA backend is chosen only on GPUs the extension was built for (capabilities are faked:
resolve reads the device type and capability, no GPU is touched)."""

from __future__ import annotations

import pytest
import torch

from loraprune import ops
from loraprune.ops import _dispatch

GPU = torch.device("cuda", 0)
IMPLEMENTATIONS = {"cuda": "os.path:join", "triton": len, "torch": len}


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device of a chosen capability, an extension built for sm_80;90 with the CUDA 13.0
    runtime, and a driver for CUDA 13.0."""
    state = {"capability": (9, 0)}
    monkeypatch.setattr(_dispatch, "_import_error", lambda module: None)
    monkeypatch.setattr(_dispatch, "cuda_extension_build", lambda: (["80", "90"], 13000))
    monkeypatch.setattr(_dispatch, "cuda_driver_version", lambda: 13000)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: state["capability"])
    return state


@pytest.mark.parametrize(
    ("capability", "runs"),
    [((9, 0), True), ((8, 0), True), ((8, 6), True), ((8, 9), True), ((10, 0), True), ((7, 5), False)],
)
def test_cuda_is_chosen_only_where_its_kernels_run(fake_gpu, capability, runs):
    """Bug: the CUDA backend was chosen on any CUDA device once loraprune._C imported, and every op
    then raised "no kernel image" on sm_70/75 with no fallback."""
    fake_gpu["capability"] = capability
    reason = _dispatch.backend_unavailable_reason("cuda", GPU)
    assert (reason is None) == runs, reason
    assert _dispatch.resolve("op", IMPLEMENTATIONS, GPU)[0] == ("cuda" if runs else "triton")
    if not runs:
        assert "8.0" in reason and "7.5" in reason
        with pytest.raises(ops.BackendUnavailableError, match=r"7\.5"):
            _dispatch.resolve("op", IMPLEMENTATIONS, GPU, "cuda")


def test_an_ampere_gpu_falls_through_when_the_build_is_for_hopper_only(fake_gpu, monkeypatch):
    monkeypatch.setattr(_dispatch, "cuda_extension_build", lambda: (["90"], 13000))
    for capability in ((8, 0), (8, 6)):
        fake_gpu["capability"] = capability
        reason = _dispatch.backend_unavailable_reason("cuda", GPU)
        assert "sm_90" in reason and f"{capability[0]}{capability[1]}" in reason
        assert _dispatch.resolve("op", IMPLEMENTATIONS, GPU)[0] == "triton"
    fake_gpu["capability"] = (9, 0)
    assert _dispatch.resolve("op", IMPLEMENTATIONS, GPU)[0] == "cuda"


def test_an_old_driver_for_the_static_runtime_falls_through(fake_gpu, monkeypatch):
    monkeypatch.setattr(_dispatch, "cuda_driver_version", lambda: 12040)
    reason = _dispatch.backend_unavailable_reason("cuda", GPU)
    assert "13.0" in reason and "12.4" in reason
    assert _dispatch.resolve("op", IMPLEMENTATIONS, GPU)[0] == "triton"
    monkeypatch.setattr(_dispatch, "cuda_driver_version", lambda: 13010)  # minor versions are compatible
    assert _dispatch.backend_unavailable_reason("cuda", GPU) is None


@pytest.mark.parametrize(
    ("archs", "capability", "runs"),
    [
        (["80"], (8, 6), True),  # cubin for 8.0 runs on later minors, and the PTX on anything later
        (["80"], (9, 0), True),
        (["86", "90"], (8, 0), False),
        (["90a"], (9, 0), True),  # arch-specific: that GPU only, and no PTX
        (["90a"], (10, 0), False),
        (["80", "90a"], (10, 0), True),  # the PTX of the newest plain arch
        (["100f"], (10, 3), True),  # family-specific: later minors of the family
        (["100f"], (12, 0), False),
    ],
)
def test_archs_run_on(archs, capability, runs):
    assert _dispatch.archs_run_on(archs, capability) == runs


def test_backend_report_names_the_build_and_the_driver_it_needs(fake_gpu):
    fake_gpu["capability"] = (7, 0)
    report = _dispatch.backend_report(GPU)
    assert report["torch"] == "available"
    assert "compute capability >= 8.0" in report["cuda"]
    assert "sm_80;90" in report["cuda"] and "CUDA >= 13.0" in report["cuda"]


def test_info_shows_why_the_cuda_backend_is_passed_over(fake_gpu, monkeypatch, tiny_llama_dir, capsys):
    import json

    from loraprune.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    fake_gpu["capability"] = (7, 5)
    assert main(["info", str(tiny_llama_dir), "--json"]) == 0
    backends = json.loads(capsys.readouterr().out)["backends"]
    assert backends["device"] == "cuda:0" and "7.5" in backends["cuda"] and "CUDA >= 13.0" in backends["cuda"]
    assert main(["info", str(tiny_llama_dir)]) == 0
    assert "backend cuda on cuda:0: its kernels need compute capability >= 8.0" in capsys.readouterr().out
