"""Shared test setup.

Without a GPU, Triton kernels run through the interpreter: TRITON_INTERPRET must be set before
triton is first imported, so it is set here, at collection start.
"""

from __future__ import annotations

import os
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


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


requires_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
