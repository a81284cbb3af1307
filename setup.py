"""Build script: the pure-Python package, with the Triton kernels of ``kernels/`` installed as
``loraprune.kernels``, and the CUDA extension ``loraprune._C`` built from ``csrc/`` whenever a
CUDA toolkit is found (``$CUDA_HOME/bin/nvcc``, else ``nvcc`` on ``PATH``).

``kernels/`` has no ``__init__.py`` and ``loraprune/kernels`` is a link to it: from the repository
root a folder without ``__init__.py`` can never shadow an installed package named ``kernels``
(Hugging Face's, which transformers imports), and ``loraprune.kernels`` is a namespace package in
editable and regular installs alike.

The extension needs no PyTorch headers: nvcc compiles the kernels, the host compiler the
pybind11 binding, and nvcc links them with the CUDA runtime linked statically, so the module
imports without a GPU or driver and works with any torch build. Environment switches:

- ``LORAPRUNE_SKIP_CUDA_BUILD=1``: pure-Python install, even with a toolkit.
- ``LORAPRUNE_FORCE_CUDA_BUILD=1``: fail instead of skipping when nothing can build the extension.
- ``LORAPRUNE_CUDA_ARCHS``: ``;``-separated SM versions, default ``80;90`` (suffixes like ``90a``
  allowed); PTX of the newest plain version is embedded too, for GPUs newer than the list.
- ``MAX_JOBS``: parallel compile jobs (default: CPU count); ``NVCC_THREADS``: nvcc ``--threads``
  per job (default 1).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from importlib.util import find_spec
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"
CUDA_SOURCES = [
    "lora_importance.cu",
    "taylor_importance.cu",
    "score_update.cu",
    "compact_linear.cu",
    "build_info.cu",
]
HOST_SOURCES = ["bindings.cpp"]
HEADERS = ["loraprune_C.h", "cuda_utils.cuh", "partial_sums.cuh", "weight_tiles.cuh"]
DEFAULT_ARCHS = "80;90"


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def notice(message: str) -> None:
    print(f"loraprune setup: {message}", file=sys.stderr)


def find_nvcc() -> str | None:
    """nvcc of ``$CUDA_HOME`` (or ``$CUDA_PATH``) if set and present, else the one on ``PATH``."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            nvcc = Path(home) / "bin" / "nvcc"
            if nvcc.is_file():
                return str(nvcc)
            notice(f"{var}={home} has no bin/nvcc; looking on PATH")
    return shutil.which("nvcc")


def find_pybind11_include() -> str | None:
    """pybind11's headers: the pybind11 package, else the copy bundled in torch's wheel (only its
    pybind11 headers are used, none of PyTorch's own), for --no-build-isolation installs."""
    try:
        import pybind11
    except ImportError:
        pass
    else:
        return pybind11.get_include()
    spec = find_spec("torch")
    if spec is not None and spec.origin is not None:
        include = Path(spec.origin).parent / "include"
        if (include / "pybind11" / "pybind11.h").is_file():
            return str(include)
    return None


def cuda_archs() -> list[str]:
    value = os.environ.get("LORAPRUNE_CUDA_ARCHS", DEFAULT_ARCHS)
    archs = [a.strip() for a in re.split(r"[;,\s]+", value) if a.strip()]
    bad = [a for a in archs if not re.fullmatch(r"\d{2,3}[af]?", a)]
    if not archs or bad:
        raise RuntimeError(
            f"LORAPRUNE_CUDA_ARCHS={value!r}: expected SM versions like '80;90' or '90a' (bad: {bad})"
        )
    return archs


def gencode_flags(archs: list[str]) -> list[str]:
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    plain = [a for a in archs if a.isdigit()]  # arch-specific (a/f) PTX does not run on later GPUs
    if plain:
        newest = max(plain, key=int)
        flags.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    return flags


def positive_int_env(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise RuntimeError(f"{name}={value!r} must be a positive integer")
    return int(value)


class CudaExtension(Extension):
    def __init__(self, name: str, nvcc: str, pybind11_include: str) -> None:
        # Built by BuildExt, not by distutils' compiler; sources and depends go into sdists.
        super().__init__(
            name,
            sources=[f"csrc/{n}" for n in (*CUDA_SOURCES, *HOST_SOURCES)],
            depends=[f"csrc/{n}" for n in HEADERS],
        )
        self.nvcc = nvcc
        self.pybind11_include = pybind11_include


class BuildExt(build_ext):
    """Compiles ``csrc/`` with ninja (plain subprocess calls when ninja is missing) into the path
    setuptools expects, so that regular, editable and in-place builds all find ``_C*.so``."""

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CudaExtension):
            super().build_extension(ext)
            return
        output = Path(self.get_ext_fullpath(ext.name)).resolve()
        output.parent.mkdir(parents=True, exist_ok=True)
        build_dir = (Path(self.build_temp) / "loraprune_C").resolve()
        build_dir.mkdir(parents=True, exist_ok=True)

        archs = cuda_archs()
        archs_define = '-DLORAPRUNE_CUDA_ARCHS="' + ";".join(archs) + '"'
        nvcc_flags = [
            "-O3",
            "-std=c++17",
            "-lineinfo",
            "--threads",
            str(positive_int_env("NVCC_THREADS", 1)),
            "-Xcompiler",
            "-fPIC",
            "-Xcompiler",
            "-fvisibility=hidden",
            "-Xptxas=--warn-on-spills",
            archs_define,
            *gencode_flags(archs),
        ]
        host_compiler = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
        host_flags = [
            "-O2",
            "-std=c++17",
            "-fPIC",
            "-fvisibility=hidden",
            f"-I{sysconfig.get_paths()['include']}",
            f"-I{ext.pybind11_include}",
        ]
        link_flags = ["-shared", "-cudart", "static"]  # static runtime: no libcudart.so dependency

        compile_jobs = []  # (source, object, compile command without -c/-o, ninja rule)
        for name in CUDA_SOURCES:
            compile_jobs.append((CSRC / name, build_dir / f"{name}.o", [ext.nvcc, *nvcc_flags], "nvcc"))
        for name in HOST_SOURCES:
            compile_jobs.append(
                (CSRC / name, build_dir / f"{name}.o", [*shlex.split(host_compiler), *host_flags], "cxx")
            )
        objects = [obj for _, obj, _, _ in compile_jobs]
        link = [ext.nvcc, *link_flags, *map(str, objects), "-o", str(output)]

        jobs = positive_int_env("MAX_JOBS", os.cpu_count() or 1)
        ninja = shutil.which("ninja")
        if ninja:
            self._write_ninja(build_dir / "build.ninja", compile_jobs, link, output)
            self._run([ninja, "-C", str(build_dir), "-j", str(jobs)])
        else:
            notice(f"ninja not found; compiling with {jobs} plain subprocess job(s)")
            with ThreadPoolExecutor(max_workers=jobs) as pool:
                commands = [
                    [*command, "-c", str(source), "-o", str(obj)] for source, obj, command, _ in compile_jobs
                ]
                list(pool.map(self._run, commands))  # list(): re-raise the first failure
            self._run(link)

    @staticmethod
    def _write_ninja(path: Path, compile_jobs: list, link: list[str], output: Path) -> None:
        def quote(args: list[str]) -> str:
            return " ".join(shlex.quote(str(a)) for a in args).replace("$", "$$")

        def escape(p: Path) -> str:
            return str(p).replace("$", "$$").replace(" ", "$ ").replace(":", "$:")

        lines = ["ninja_required_version = 1.3", ""]
        lines += [
            "rule nvcc",
            "  command = $cmd -MD -MF $out.d -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "",
        ]
        lines += [
            "rule cxx",
            "  command = $cmd -MMD -MF $out.d -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "",
        ]
        lines += ["rule link", "  command = $cmd", ""]
        for source, obj, command, kind in compile_jobs:
            lines += [f"build {escape(obj)}: {kind} {escape(source)}", f"  cmd = {quote(command)}"]
        objects = " ".join(escape(obj) for _, obj, _, _ in compile_jobs)
        lines += [f"build {escape(output)}: link {objects}", f"  cmd = {quote(link)}", ""]
        path.write_text("\n".join(lines))

    @staticmethod
    def _run(command: list[str]) -> None:
        print(" ".join(shlex.quote(str(c)) for c in command), file=sys.stderr)
        subprocess.run(command, check=True, cwd=ROOT)


def cuda_extensions() -> list[Extension]:
    """The extension to build, or none (with a one-line notice, or an error when forced)."""
    force = env_flag("LORAPRUNE_FORCE_CUDA_BUILD")
    if env_flag("LORAPRUNE_SKIP_CUDA_BUILD"):
        notice("LORAPRUNE_SKIP_CUDA_BUILD is set: installing without the CUDA extension loraprune._C")
        return []
    nvcc = find_nvcc()
    pybind11_include = find_pybind11_include()
    python_header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    missing = [
        what
        for what, found in (
            ("nvcc (set CUDA_HOME or put nvcc on PATH)", nvcc),
            ("pybind11 (pip install pybind11)", pybind11_include),
            (f"the Python headers ({python_header})", python_header.is_file()),
        )
        if not found
    ]
    if missing:
        message = f"cannot build the CUDA extension loraprune._C, missing {' and '.join(missing)}"
        if force:
            raise RuntimeError(f"{message} (LORAPRUNE_FORCE_CUDA_BUILD is set)")
        notice(f"{message}; installing the pure-Python package (Triton/PyTorch backends only)")
        return []
    cuda_archs()  # reject a bad LORAPRUNE_CUDA_ARCHS before any compile
    return [CudaExtension("loraprune._C", nvcc, pybind11_include)]


packages = [*find_packages(include=["loraprune", "loraprune.*"]), "loraprune.kernels"]

setup(
    packages=packages,
    ext_modules=cuda_extensions(),
    cmdclass={"build_ext": BuildExt},
)
