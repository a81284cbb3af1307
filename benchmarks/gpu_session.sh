#!/usr/bin/env bash
# What a session with a lent GPU runs, in two device calls of under 10 minutes each:
#   bash benchmarks/gpu_session.sh tests   # build the extension, GPU tests, compute-sanitizer memcheck
#   bash benchmarks/gpu_session.sh bench   # the quick benchmark suite
#   bash benchmarks/gpu_session.sh vllm    # vLLM throughput, dense vs pruned (only where vLLM is installed)
#   bash benchmarks/gpu_session.sh fastpaths [PATH...]  # masked LoRA linear fast paths vs old path vs cuBLAS only
#   bash benchmarks/gpu_session.sh importance  # importance ops: packed int8/nf4 W vs bf16 vs row blocks; CUDA factor stagings
#                                              (quantized_base.csv, and kernels.csv: lora_importance_packed, cuda vs cuda_single)
# Prepare once on the development machine (the GPU machine has no network and no ../shared, and takes
# at most 64 MiB of carried files beside the repository):
#   bash benchmarks/gpu_session.sh prepare   # copies what the GPU stages read into .device/shared
# and name .device in the call's carry. Output goes to $OUT (the device tool brings back at most
# 8 files): one log per stage, plus the benchmark CSVs. The exit status is the first failure's.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: gpu_session.sh prepare|tests|bench|vllm|fastpaths|importance}
if [ "$stage" = prepare ]; then
    # The fixture the GPU tests and benchmarks load (tiny-llama; the GQA fixture's CPU tests skip
    # there) and the texts they read: about 40 MB of the 64 MiB a device call may carry.
    shared=${LORAPRUNE_SHARED:-$(cd .. && pwd)/shared}
    dest=${GPU_PAYLOAD_DIR:-$PWD/.device/shared}
    rm -rf "$dest" && mkdir -p "$dest/fixtures" "$dest/data"
    cp -r "$shared/fixtures/tiny-llama" "$dest/fixtures/"
    cp -r "$shared/data/wikitext-2" "$shared/data/ptb" "$shared/data/docs-heldout" \
        "$shared/data/calib-wikitext103-train-part.txt" "$dest/data/"
    size=$(du -sm "$dest" | cut -f1)
    echo "GPU payload: $dest, $size MiB"
    [ "$size" -le 48 ] || { echo "GPU payload over 48 MiB: the device tool carries 64 MiB at most" >&2; exit 1; }
    exit 0
fi
out=${OUT:-$PWD/benchmarks/results}
mkdir -p "$out"
export LORAPRUNE_SHARED=${LORAPRUNE_SHARED:-$PWD/.device/shared} PYTHONUNBUFFERED=1
log="$out/$stage.log"
status=0
# run CMD...: runs it, and keeps the first non-zero exit status as the script's.
run() {
    "$@"
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "gpu_session: exit $rc from: $*"
        [ "$status" -ne 0 ] || status=$rc
    fi
    return "$rc"
}
{
    date -u +%FT%TZ
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader
    python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
    if time run env LORAPRUNE_FORCE_CUDA_BUILD=1 LORAPRUNE_CUDA_ARCHS="${LORAPRUNE_CUDA_ARCHS:-80;90}" \
        python3 -m pip install -q --no-build-isolation --no-deps -e .; then
        case "$stage" in
        tests)
            # the extension just built must be tested, not skipped
            export LORAPRUNE_EXPECT_CUDA_EXTENSION=1
            run python3 -m pytest -q -ra tests
            run compute-sanitizer --tool memcheck --error-exitcode 3 \
                python3 -m pytest -q -x -m "not slow" tests/test_cuda_extension.py
            ;;
        bench)
            run python3 -m benchmarks.run_all --quick --results-dir "$out"
            ;;
        vllm)
            run python3 -m benchmarks.engine_vllm --shape llama7b --layers 8 --results-dir "$out"
            ;;
        fastpaths)  # also part of bench; alone when device time is short. Names after the stage time
            # those paths' cases only (`fastpaths lora_k_steps persistent tma`): every new autotune key
            # compiles its configs, so split the paths over two calls if one would pass 10 minutes.
            filter=test_masked_lora_linear_fast_paths
            if [ $# -gt 1 ]; then
                shift
                filter="$filter and ($(echo "$*" | sed 's/ / or /g'))"
            fi
            run python3 -m pytest benchmarks/test_kernels.py --benchmark-only -q -p no:cacheprovider --quick \
                -k "$filter" --results-dir "$out"
            ;;
        importance)  # needs bitsandbytes with its CUDA backend
            run python3 -m benchmarks.quantized_base importance --device cuda --results-dir "$out"
            # kernels.csv: packed W vs bf16 per backend (lora_importance_packed), both CUDA stagings
            run python3 -m pytest benchmarks/test_kernels.py --benchmark-only -q -p no:cacheprovider --quick \
                -k "test_lora_importance_packed or (test_lora_importance and cuda)" --results-dir "$out"
            ;;
        *) run false "unknown stage $stage" ;;
        esac
    fi
} >"$log" 2>&1
tail -n 60 "$log"
exit $status
