"""The kernels inside the whole loop: a short pruning run with each backend forced gives the same
losses, masks and LoRA factors as the PyTorch references (Triton through the interpreter on the CPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import requires_cuda, requires_triton_interpreter
from tiny_models import random_tokens, tiny_model

from loraprune import LoraPruneConfig
from loraprune.nn import lora_modules
from loraprune.run import PruningRun, RunConfig


def short_run(criterion: str, device: str = "cpu", dtype: torch.dtype = torch.float32, steps: int = 4):
    model = tiny_model("llama-gqa-tied", layers=2).to(device)
    run = PruningRun(
        model.to(dtype),
        random_tokens(batch=12, length=10, seed=2),
        LoraPruneConfig(ratio=0.5, criterion=criterion, layers=(0, 1), lora_dropout=0.0),
        RunConfig(steps=steps, batch_size=2, seq_len=10, prune_every=2, save_every=0),
        progress=False,
    )
    losses = []
    for _ in range(steps):
        run.run(stop_after=1)
        losses.append(run.last_loss)
    factors = {
        p: (m.lora_A.detach().float().cpu(), m.lora_B.detach().float().cpu())
        for p, m in lora_modules(run.model).items()
        if m.lora_A is not None
    }
    return losses, [k.clone() for k in run.pruner.keep], factors


@requires_triton_interpreter
@pytest.mark.parametrize("criterion", ["lora", "taylor"])
def test_triton_backend_runs_the_loop_like_the_reference(monkeypatch, criterion):
    monkeypatch.setenv("LORAPRUNE_BACKEND", "torch")
    reference = short_run(criterion)
    monkeypatch.setenv("LORAPRUNE_BACKEND", "triton")  # taylor layers fall back to torch (weight grads)
    fused = short_run(criterion)
    torch.testing.assert_close(fused[0], reference[0], rtol=1e-5, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(fused[1], reference[1], strict=True))
    for path, (a, b) in reference[2].items():
        torch.testing.assert_close(fused[2][path][0], a, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fused[2][path][1], b, rtol=1e-4, atol=1e-5)


@requires_cuda
def test_gpu_kernels_on_and_off_give_matching_bf16_runs(monkeypatch, tiny_llama_dir, calib_text):
    """tiny-llama, 30 steps in bf16: default dispatch (kernels) against the references."""
    from loraprune.data import read_text, tokenize, windows
    from loraprune.io import load_model, load_tokenizer

    data = windows(tokenize(load_tokenizer(tiny_llama_dir), read_text(calib_text)[:400_000]), 256)

    def run(backend: str) -> list[float]:
        monkeypatch.setenv("LORAPRUNE_BACKEND", backend)
        model = load_model(tiny_llama_dir, dtype="bfloat16", device="cuda")
        pruning = PruningRun(
            model,
            data,
            LoraPruneConfig(ratio=0.5, lora_dropout=0.0),
            RunConfig(steps=30, batch_size=4, seq_len=256, prune_every=5, save_every=0),
            amp_dtype=torch.bfloat16,
            progress=False,
        )
        losses = []
        for _ in range(30):
            pruning.run(stop_after=1)
            losses.append(pruning.last_loss)
        return losses

    reference, fused = run("torch"), run("auto")
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(reference), rtol=2e-2, atol=2e-2)
