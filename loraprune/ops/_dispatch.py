"""Backend choice for the ops: ``cuda`` (the compiled extension) > ``triton`` > ``torch``.

Automatic choice takes the first backend that implements the op, is installed and can run on
the inputs' device; CPU tensors always take ``torch``. ``LORAPRUNE_BACKEND=torch|triton|cuda``
(or an op's ``backend=`` argument) forces a backend for every op that implements it and fails
with :class:`BackendUnavailableError` when that backend cannot run; an op without an
implementation in the forced backend falls back to the automatic choice among the backends
after it. ``triton`` accepts CPU tensors when ``TRITON_INTERPRET=1`` (the tests use this).
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable, Mapping

import torch

BACKENDS = ("cuda", "triton", "torch")
ENV_VAR = "LORAPRUNE_BACKEND"
CUDA_BUILD_HINT = (
    "build it with a CUDA toolkit (nvcc on PATH or CUDA_HOME set): "
    "LORAPRUNE_FORCE_CUDA_BUILD=1 pip install --no-build-isolation -e ."
)


class BackendUnavailableError(RuntimeError):
    """A backend was requested that cannot run here."""


@functools.cache
def _import_error(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as exc:  # an extension built against another CUDA raises OSError/ImportError
        return f"{type(exc).__name__}: {exc}"
    return None


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def backend_unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device`` (``None`` when it can)."""
    if backend == "torch":
        return None
    if backend == "triton":
        error = _import_error("triton")
        if error:
            return f"Triton is not installed ({error}); pip install triton"
        if device.type != "cuda" and not triton_interpreter():
            return f"Triton kernels need CUDA tensors (got {device}); set TRITON_INTERPRET=1 to interpret on the CPU"
        return None
    if backend == "cuda":
        error = _import_error("loraprune._C")
        if error:
            return f"the CUDA extension loraprune._C is not built ({error}); {CUDA_BUILD_HINT}"
        if device.type != "cuda":
            return f"the CUDA extension needs CUDA tensors (got {device})"
        return None
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def requested_backend(backend: str | None) -> str | None:
    """The forced backend (argument first, then ``LORAPRUNE_BACKEND``), or ``None`` for automatic."""
    value = backend if backend is not None else os.environ.get(ENV_VAR) or None
    if value is None or value == "auto":
        return None
    if value not in BACKENDS:
        source = "backend" if backend is not None else ENV_VAR
        raise ValueError(f"{source} must be one of {(*BACKENDS, 'auto')}, got {value!r}")
    return value


def resolve(
    op: str,
    implementations: Mapping[str, str | Callable],
    device: torch.device,
    backend: str | None = None,
    unsupported: Mapping[str, str] | None = None,
) -> tuple[str, Callable]:
    """Pick the backend and implementation of ``op`` for tensors on ``device``.

    ``implementations`` maps backend names to callables or ``"module:function"`` paths that are
    imported on first use, so that a missing Triton or extension costs nothing until called.
    ``unsupported`` maps backends that cannot take these particular inputs to the reason: the
    automatic choice passes over them, and forcing one fails with that reason.
    """
    unsupported = unsupported or {}
    forced = requested_backend(backend)
    if forced is not None and forced in implementations:
        reason = unsupported.get(forced) or backend_unavailable_reason(forced, device)
        if reason:
            raise BackendUnavailableError(f"{op}: backend {forced!r} was requested but {reason}")
        return forced, _load(implementations[forced])
    candidates = BACKENDS[BACKENDS.index(forced) + 1 :] if forced else BACKENDS
    for name in candidates:
        runs_here = name == "torch" or (
            device.type == "cuda"
            and name not in unsupported
            and backend_unavailable_reason(name, device) is None
        )
        if name in implementations and runs_here:
            return name, _load(implementations[name])
    raise BackendUnavailableError(f"{op}: no backend can run on {device}")  # torch always can


def _load(impl: str | Callable) -> Callable:
    if callable(impl):
        return impl
    module, _, function = impl.partition(":")
    return getattr(importlib.import_module(module), function)
