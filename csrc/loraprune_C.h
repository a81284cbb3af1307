// Host API of the loraprune CUDA kernels: plain C++ types only (device pointers as integers,
// the CUDA stream as an opaque handle), so that the pybind11 binding compiles without CUDA or
// PyTorch headers. Every function checks its arguments (std::invalid_argument) and every CUDA
// call and launch (std::runtime_error carrying the CUDA error string).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace loraprune {

// Element type codes shared with loraprune/ops/cuda.py.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// How the frozen weight W is stored (loraprune/ops/quantized_weight.py). kDense: elements of
// weight_dtype with row stride weight_row_stride. kInt8: int8 codes with row stride
// weight_row_stride and float32 row absmax `scales` (out): W = q·scale/127 (LLM.int8()). kFourBit:
// the out·in 4-bit codes of row-major W two to a byte (element e in byte e/2, high nibble for even
// e), float32 `scales` (⌈out·in/blocksize⌉) the absmax of each block of `blocksize` (a power of two)
// consecutive elements and `code` the float32 value of each of the 16 nibbles (NF4, FP4).
enum class WeightFormat : int { kDense = 0, kInt8 = 1, kFourBit = 2 };

struct QuantizedWeightArgs {
  WeightFormat format = WeightFormat::kDense;
  std::uintptr_t scales = 0;
  std::uintptr_t code = 0;
  std::int64_t blocksize = 0;
};

// Launch context: the device owning every pointer and the stream to launch on
// (torch.cuda.current_stream(device).cuda_stream; 0 is the legacy default stream).
struct LaunchContext {
  int device;
  std::uintptr_t stream;
};

// Floats of scratch lora_importance needs for its deterministic two-pass row/column reduction.
std::int64_t lora_importance_workspace_floats(std::int64_t out_features, std::int64_t in_features);

// row_sums[i] = Σ_j I[i, j], col_sums[j] = Σ_i I[i, j] with I = |G ⊙ (W + s·B·A)| (or its
// square) and G = gB·(A − gA) + B·gA. W is out×in with unit column stride, stored as `quantized`
// says (weight_dtype and weight_row_stride in elements apply to dense and int8 W); A, gA are
// rank×in and B, gB out×rank, contiguous float32. double_buffer stages the factors with cp.async
// into two alternating buffers (the next rank chunk loads while this one multiplies); false keeps
// the single-buffer staging (converted to TF32 on the way into shared memory).
void lora_importance(const LaunchContext& ctx, std::uintptr_t weight, DType weight_dtype,
                     std::int64_t out_features, std::int64_t in_features, std::int64_t weight_row_stride,
                     std::uintptr_t lora_a, std::uintptr_t lora_b, std::uintptr_t grad_a,
                     std::uintptr_t grad_b, std::int64_t rank, double scaling, bool squared,
                     std::uintptr_t row_sums, std::uintptr_t col_sums, std::uintptr_t workspace,
                     std::int64_t workspace_floats, const QuantizedWeightArgs& quantized = {},
                     bool double_buffer = true);

// Floats of scratch taylor_importance needs for its deterministic two-pass row/column reduction.
std::int64_t taylor_importance_workspace_floats(std::int64_t out_features, std::int64_t in_features);

// row_sums[i] = Σ_j I[i, j], col_sums[j] = Σ_i I[i, j] with I = |(dYᵀX) ⊙ (W + s·B·A)| (or its
// square). X (tokens × in) and dY (tokens × out) share `dtype` and have unit column stride and row
// strides x_row_stride / grad_row_stride (elements); W is out×in with unit column stride, stored as
// `quantized` says (see lora_importance); A (rank × in) and B (out × rank) are contiguous float32,
// unused when rank is 0 (W' = W).
void taylor_importance(const LaunchContext& ctx, std::uintptr_t x, std::uintptr_t grad_y, DType dtype,
                       std::int64_t tokens, std::int64_t out_features, std::int64_t in_features,
                       std::int64_t x_row_stride, std::int64_t grad_row_stride, std::uintptr_t weight,
                       DType weight_dtype, std::int64_t weight_row_stride, std::uintptr_t lora_a,
                       std::uintptr_t lora_b, std::int64_t rank, double scaling, bool squared,
                       std::uintptr_t row_sums, std::uintptr_t col_sums, std::uintptr_t workspace,
                       std::int64_t workspace_floats, const QuantizedWeightArgs& quantized = {});

// One score update (see loraprune/ops/score_update.py): parts are 1-D vectors of any float
// dtype and stride whose lengths are positive multiples of num_units; the counters are int64.
void score_update(const LaunchContext& ctx, std::uintptr_t scores, std::int64_t num_units,
                  const std::vector<std::uintptr_t>& parts, const std::vector<std::int64_t>& part_lengths,
                  const std::vector<std::int64_t>& part_strides, const std::vector<int>& part_dtypes,
                  double decay, std::uintptr_t num_updates, std::uintptr_t num_skipped);

// out = (W + s·B·A)[rows][:, cols] in W's dtype (dense, row-major num_rows×num_cols), fp32
// accumulation. rank 0 means no LoRA (A, B unused); rows/cols 0 mean "all", else int64 indices
// that the caller has checked to lie in range.
void compact_linear(const LaunchContext& ctx, std::uintptr_t weight, DType weight_dtype,
                    std::int64_t out_features, std::int64_t in_features, std::int64_t weight_row_stride,
                    std::uintptr_t lora_a, std::uintptr_t lora_b, std::int64_t rank, double scaling,
                    std::uintptr_t rows, std::int64_t num_rows, std::uintptr_t cols, std::int64_t num_cols,
                    std::uintptr_t out);

// Build facts for diagnostics: the CUDA runtime version compiled against (e.g. 13000) and the
// architecture list the kernels were compiled for (e.g. "80;90").
int cuda_runtime_version();
std::string cuda_architectures();

}  // namespace loraprune
