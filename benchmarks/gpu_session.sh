#!/usr/bin/env bash
# What a session with a lent GPU runs, in two device calls of under 10 minutes each:
#   bash benchmarks/gpu_session.sh tests   # build the extension, GPU tests, compute-sanitizer memcheck
#   bash benchmarks/gpu_session.sh bench   # the quick benchmark suite
#   bash benchmarks/gpu_session.sh vllm    # vLLM throughput, dense vs pruned (only where vLLM is installed)
#   bash benchmarks/gpu_session.sh fastpaths [PATH...]  # masked LoRA linear fast paths vs old path vs cuBLAS only
#   bash benchmarks/gpu_session.sh importance  # importance ops: packed int8/nf4 W vs bf16 vs row blocks; CUDA factor stagings
#                                              (quantized_base.csv, and kernels.csv: lora_importance_packed, cuda vs cuda_single)
# Prepare once on the development machine (the GPU machine has no network and no ../shared):
#   mkdir -p .device/shared && cp -r ../shared/fixtures ../shared/data .device/shared/
# and name .device in the call's carry. Output goes to $OUT (the device tool brings back at most
# 8 files): one log per stage, plus the benchmark CSVs.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: gpu_session.sh tests|bench|vllm|fastpaths|importance}
out=${OUT:-$PWD/benchmarks/results}
mkdir -p "$out"
export LORAPRUNE_SHARED=${LORAPRUNE_SHARED:-$PWD/.device/shared} PYTHONUNBUFFERED=1
log="$out/$stage.log"
{
    date -u +%FT%TZ
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader
    python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
    time LORAPRUNE_FORCE_CUDA_BUILD=1 LORAPRUNE_CUDA_ARCHS="${LORAPRUNE_CUDA_ARCHS:-80;90}" \
        python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
    case "$stage" in
    tests)
        python3 -m pytest -q -ra tests
        compute-sanitizer --tool memcheck --error-exitcode 3 \
            python3 -m pytest -q -x -m "not slow" tests/test_cuda_extension.py
        ;;
    bench)
        python3 -m benchmarks.run_all --quick --results-dir "$out"
        ;;
    vllm)
        python3 -m benchmarks.engine_vllm --shape llama7b --layers 8 --results-dir "$out"
        ;;
    fastpaths)  # also part of bench; alone when device time is short. Names after the stage time
        # those paths' cases only (`fastpaths lora_k_steps persistent tma`): every new autotune key
        # compiles its configs, so split the paths over two calls if one would pass 10 minutes.
        filter=test_masked_lora_linear_fast_paths
        if [ $# -gt 1 ]; then
            shift
            filter="$filter and ($(echo "$*" | sed 's/ / or /g'))"
        fi
        python3 -m pytest benchmarks/test_kernels.py --benchmark-only -q -p no:cacheprovider --quick \
            -k "$filter" --results-dir "$out"
        ;;
    importance)  # needs bitsandbytes with its CUDA backend
        python3 -m benchmarks.quantized_base importance --device cuda --results-dir "$out"
        # kernels.csv: packed W vs bf16 per backend (lora_importance_packed), both CUDA stagings
        python3 -m pytest benchmarks/test_kernels.py --benchmark-only -q -p no:cacheprovider --quick \
            -k "test_lora_importance_packed or (test_lora_importance and cuda)" --results-dir "$out"
        ;;
    *) echo "unknown stage $stage" ;;
    esac
} >"$log" 2>&1
status=$?
tail -n 60 "$log"
exit $status
