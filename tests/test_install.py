"""The package as a user's checkout holds it: commands typed at the repository root must import
the installed dependencies, not folders of the repository that share their names."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_python_at_root(code: str, pythonpath: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_kernels_folder_does_not_shadow_an_installed_kernels_package(tmp_path):
    # transformers >= 5.25 imports Hugging Face's `kernels` at import time; `python -c` and
    # `python -m pytest` put the repository root first on sys.path.
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("INSTALLED = True\n")
    result = run_python_at_root("import kernels; print(kernels.INSTALLED)", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"


def test_triton_kernels_import_as_loraprune_kernels(tmp_path):
    code = "import loraprune.kernels.masked_lora_linear as m; print(m.__file__)"
    result = run_python_at_root(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).resolve() == ROOT / "kernels" / "masked_lora_linear.py"
