"""The Triton score update: the update counter is read before any thread can write it.

The kernel's one program reads ``num_updates`` to decide between taking the first update and
blending, and its thread 0 stores ``count + finite`` at the end. When the count was loaded after
pass 1, the sm_90 PTX for parts of width 1 had no ``bar.sync`` between that load and that store,
so a lagging warp could see the new count and blend the first update instead of taking it. The
interpreter runs a program as whole-tile numpy operations, one statement at a time, so it cannot
interleave warps and cannot show the race. What it can show is the order of the memory
operations the kernel issues: the fix loads the count before it reads any part (at kernel start,
ahead of every barrier of pass 1), which this test observes through the interpreter's loads, and
the behaviour the race broke: the first update is taken, not blended.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TRITON_SKIP_REASON

from loraprune.ops._dispatch import triton_interpreter
from loraprune.ops.score_update import score_update_reference

if TRITON_SKIP_REASON:
    pytest.skip(TRITON_SKIP_REASON, allow_module_level=True)
from loraprune.kernels import score_update as score_kernel

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parts_of_width_one(num_units: int, num_parts: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(num_units, generator=g).to(DEVICE) for _ in range(num_parts)]


@pytest.mark.skipif(not triton_interpreter(), reason="observes the loads through the Triton interpreter")
def test_update_count_is_loaded_before_any_part(monkeypatch):
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    loads: list[np.ndarray] = []
    for name in ("create_load", "create_masked_load"):
        original = getattr(builder, name)

        def spy(self, ptrs, *args, _original=original):
            loads.append(np.asarray(ptrs.data).reshape(-1).astype(np.uint64))
            return _original(self, ptrs, *args)

        monkeypatch.setattr(builder, name, spy)
    num_units = 50
    parts = parts_of_width_one(num_units, 3, seed=0)
    counters = (
        torch.zeros((), dtype=torch.int64, device=DEVICE),
        torch.zeros((), dtype=torch.int64, device=DEVICE),
    )
    score_kernel.score_update(torch.zeros(num_units, device=DEVICE), parts, 0.9, *counters)

    def first_load(tensor: torch.Tensor) -> int:
        start, end = tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size()
        return next(
            i for i, addresses in enumerate(loads) if ((addresses >= start) & (addresses < end)).any()
        )

    assert first_load(counters[0]) < min(first_load(part) for part in parts)


def test_first_update_is_taken_not_blended():
    num_units = 70
    old = torch.full((num_units,), 123.0, device=DEVICE)  # stale scores a blend would leak
    for parts in (parts_of_width_one(num_units, 3, seed=1), parts_of_width_one(num_units, 1, seed=2)):
        scores, expected = old.clone(), old.clone()
        state = [torch.zeros((), dtype=torch.int64, device=DEVICE) for _ in range(2)]
        state_ref = [t.clone() for t in state]
        score_kernel.score_update(scores, parts, 0.9, *state)
        score_update_reference(expected, parts, 0.9, *state_ref)
        torch.testing.assert_close(scores, expected, rtol=1e-6, atol=1e-6)
        assert (scores.abs() < 10).all()  # nothing of the stale 123 was blended in
        assert state[0].item() == 1 and state[1].item() == 0
