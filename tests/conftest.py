"""Shared test setup.

Without a GPU, Triton kernels run through the interpreter: TRITON_INTERPRET must be set before
triton is first imported, so it is set here, at collection start.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LORAPRUNE_SHARED", REPO_ROOT.parent / "shared")).resolve()


def shared_path(*parts: str) -> Path:
    """A path inside ../shared (or $LORAPRUNE_SHARED); skips the test when it is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not found: set LORAPRUNE_SHARED to the shared/ folder")
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir() -> Path:
    return shared_path("fixtures", "tiny-llama")


@pytest.fixture(scope="session")
def wikitext_test() -> Path:
    return shared_path("data", "wikitext-2", "test.txt")


@pytest.fixture(scope="session")
def calib_text() -> Path:
    return shared_path("data", "calib-wikitext103-train-part.txt")


requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device)"
)


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


def triton_skip_reason() -> str | None:
    """Why the Triton kernels cannot run in this environment, or None when they can."""
    try:
        import triton
    except ImportError:
        return "triton is not installed"
    if os.environ.get("TRITON_INTERPRET") == "1":
        import numpy

        # Before 3.7 the interpreter calls int() on 1-element arrays, an error since numpy 2.4.
        if _release(triton.__version__) < (3, 7) and _release(numpy.__version__) >= (2, 4):
            return (
                f"the interpreter of triton {triton.__version__} fails under numpy {numpy.__version__}: "
                "install triton>=3.7 or numpy<2.4"
            )
    return None


TRITON_SKIP_REASON = triton_skip_reason()
requires_triton = pytest.mark.skipif(TRITON_SKIP_REASON is not None, reason=str(TRITON_SKIP_REASON))
# Tests that hand Triton CPU tensors: they run through the interpreter only, which a GPU machine
# does not set (there the kernel tests run on CUDA tensors instead).
requires_triton_interpreter = pytest.mark.skipif(
    TRITON_SKIP_REASON is not None or os.environ.get("TRITON_INTERPRET") != "1",
    reason=str(TRITON_SKIP_REASON or "runs Triton on CPU tensors: needs TRITON_INTERPRET=1"),
)
