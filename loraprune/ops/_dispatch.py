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
        return _cuda_device_reason(device)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


# The extension's kernels use bf16/TF32 mma.sync and cp.async: compute capability 8.0 or later.
CUDA_MIN_CAPABILITY = (8, 0)


@functools.cache
def cuda_extension_build() -> tuple[list[str], int]:
    """The SM architectures ``loraprune._C`` was built for (``LORAPRUNE_CUDA_ARCHS``) and the
    version of the CUDA runtime it links statically (1000·major + 10·minor)."""
    ext = importlib.import_module("loraprune._C")
    return [a for a in ext.CUDA_ARCHITECTURES.split(";") if a], int(ext.CUDA_RUNTIME_VERSION)


@functools.cache
def cuda_driver_version() -> int | None:
    """The CUDA version the installed driver supports (``cuDriverGetVersion``), ``None`` without one."""
    import ctypes

    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
        version = ctypes.c_int()
        return version.value if libcuda.cuDriverGetVersion(ctypes.byref(version)) == 0 else None
    except OSError:
        return None


def archs_run_on(archs: list[str], capability: tuple[int, int]) -> bool:
    """Whether code built for ``archs`` runs on a GPU of ``capability``: a cubin for sm_XY (or the
    family-specific XYf) runs on X.Y and later minors of X, an arch-specific XYa on X.Y only, and
    the PTX setup.py embeds for the newest plain arch is JIT-compiled on any later GPU."""
    major, minor = capability
    device_sm = 10 * major + minor
    plain = [int(a) for a in archs if a.isdigit()]
    if plain and device_sm >= max(plain):
        return True
    for arch in archs:
        sm = int(arch.rstrip("af"))
        if arch.endswith("a") and sm == device_sm:
            return True
        if not arch.endswith("a") and sm // 10 == major and sm <= device_sm:
            return True
    return False


def _version_text(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}"


def _cuda_device_reason(device: torch.device) -> str | None:
    """Why the built extension cannot run on this CUDA device (``None`` when it can)."""
    try:
        capability = torch.cuda.get_device_capability(device)
    except (AssertionError, RuntimeError) as exc:  # a torch without CUDA, or no usable device
        return f"the CUDA device cannot be queried ({exc})"
    archs, runtime = cuda_extension_build()
    if capability < CUDA_MIN_CAPABILITY:
        return (
            f"its kernels need compute capability >= {CUDA_MIN_CAPABILITY[0]}.{CUDA_MIN_CAPABILITY[1]}, "
            f"{device} is {capability[0]}.{capability[1]}"
        )
    if not archs_run_on(archs, capability):
        return (
            f"it was built for sm_{';'.join(archs)}, which cannot run on {device} "
            f"(sm_{capability[0]}{capability[1]}); rebuild with LORAPRUNE_CUDA_ARCHS including "
            f"{capability[0]}{capability[1]}: {CUDA_BUILD_HINT}"
        )
    driver = cuda_driver_version()
    # Minor-version compatibility: a driver for CUDA X.y runs any X.z runtime.
    if driver is not None and driver // 1000 < runtime // 1000:
        return (
            f"its static CUDA runtime {_version_text(runtime)} needs a driver for CUDA >= "
            f"{runtime // 1000}.0, this driver supports CUDA {_version_text(driver)}"
        )
    return None


def backend_report(device: torch.device) -> dict[str, str]:
    """Per backend, ``"available"`` or why it cannot run on ``device``; the ``cuda`` entry also
    names the architectures and CUDA runtime of the build and the driver it needs."""
    report = {name: backend_unavailable_reason(name, device) or "available" for name in BACKENDS}
    if _import_error("loraprune._C") is None:
        archs, runtime = cuda_extension_build()
        driver = cuda_driver_version()
        report["cuda"] += (
            f" (built for sm_{';'.join(archs)}, static CUDA runtime {_version_text(runtime)}: needs a "
            f"driver for CUDA >= {runtime // 1000}.0; driver here: "
            f"{'none' if driver is None else 'CUDA ' + _version_text(driver)})"
        )
    return report


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
        if name not in implementations:
            continue
        runs_here = name == "torch" or (
            device.type == "cuda"
            and name not in unsupported
            and backend_unavailable_reason(name, device) is None
        )
        if runs_here:
            return name, _load(implementations[name])
    raise BackendUnavailableError(f"{op}: no backend can run on {device}")  # torch always can


def _load(impl: str | Callable) -> Callable:
    if callable(impl):
        return impl
    module, _, function = impl.partition(":")
    return getattr(importlib.import_module(module), function)
