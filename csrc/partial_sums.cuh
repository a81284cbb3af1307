// The importance kernels' deterministic reduction, shared by lora_importance and taylor_importance:
// the first kernel writes per-tile partial sums with plain stores, sum_partials_kernel adds them
// in a fixed order (no atomics). The host helpers below are both launchers' common part:
// workspace size, output checks, zero sums of an empty product, and the second pass.
#pragma once

#include <cstdint>
#include <string>

#include "cuda_utils.cuh"

namespace loraprune {
namespace {

// row_sums[i] = Σ_t row_partials[t][i] over the column tiles, col_sums likewise over the row
// tiles; consecutive threads read consecutive addresses of each partial row.
__global__ void __launch_bounds__(256) sum_partials_kernel(const float* __restrict__ row_partials, int out_features,
                                                            int col_tiles, float* __restrict__ row_sums,
                                                            const float* __restrict__ col_partials, int in_features,
                                                            int row_tiles, float* __restrict__ col_sums) {
  const std::int64_t total = static_cast<std::int64_t>(out_features) + in_features;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    float v = 0.f;
    if (i < out_features) {
      for (int t = 0; t < col_tiles; ++t) {
        v += row_partials[static_cast<std::int64_t>(t) * out_features + i];
      }
      row_sums[i] = v;
    } else {
      const std::int64_t j = i - out_features;
      for (int t = 0; t < row_tiles; ++t) {
        v += col_partials[static_cast<std::int64_t>(t) * in_features + j];
      }
      col_sums[j] = v;
    }
  }
}

// Where an importance launch writes: one row partial per (column tile, row), one column partial
// per (row tile, column), in the caller's workspace; the grid has a CTA per tile.
struct PartialSums {
  int out_features;
  int in_features;
  std::int64_t row_tiles;
  std::int64_t col_tiles;
  float* row_partials;  // [col_tiles][out]
  float* col_partials;  // [row_tiles][in]
  dim3 grid;
};

inline std::int64_t partial_sums_floats(std::int64_t out_features, std::int64_t in_features, int tile_rows,
                                        int tile_cols) {
  return ceil_div(in_features, tile_cols) * out_features + ceil_div(out_features, tile_rows) * in_features;
}

// Checks the sizes, the outputs and the workspace (std::invalid_argument starting with `where`).
inline void check_importance_outputs(const std::string& where, std::int64_t out_features, std::int64_t in_features,
                                     std::uintptr_t row_sums, std::uintptr_t col_sums, std::uintptr_t workspace,
                                     std::int64_t workspace_floats, int tile_rows, int tile_cols,
                                     const char* workspace_function) {
  require(out_features >= 0 && out_features <= kInt32Max && in_features >= 0 && in_features <= kInt32Max,
          where + "out_features and in_features must lie in [0, 2^31)");
  require(workspace_floats >= partial_sums_floats(out_features, in_features, tile_rows, tile_cols),
          where + "workspace is smaller than " + workspace_function + "(out_features, in_features)");
  require(row_sums != 0 || out_features == 0, where + "row_sums is a null pointer");
  require(col_sums != 0 || in_features == 0, where + "col_sums is a null pointer");
  require(workspace != 0 || out_features == 0 || in_features == 0, where + "workspace is a null pointer");
}

// Zero sums when there is nothing to multiply (`empty`); returns whether it did.
inline bool zero_sums_if_empty(bool empty, std::int64_t out_features, std::int64_t in_features, std::uintptr_t row_sums,
                               std::uintptr_t col_sums, cudaStream_t stream, const char* op) {
  if (!empty) {
    return false;
  }
  if (out_features > 0) {
    LORAPRUNE_CUDA_CHECK(cudaMemsetAsync(reinterpret_cast<void*>(row_sums), 0, out_features * sizeof(float), stream),
                         op);
  }
  if (in_features > 0) {
    LORAPRUNE_CUDA_CHECK(cudaMemsetAsync(reinterpret_cast<void*>(col_sums), 0, in_features * sizeof(float), stream),
                         op);
  }
  return true;
}

inline PartialSums partial_sums(std::uintptr_t workspace, std::int64_t out_features, std::int64_t in_features,
                                int tile_rows, int tile_cols, const char* op) {
  PartialSums sums{};
  sums.out_features = static_cast<int>(out_features);
  sums.in_features = static_cast<int>(in_features);
  sums.row_tiles = ceil_div(out_features, tile_rows);
  sums.col_tiles = ceil_div(in_features, tile_cols);
  sums.row_partials = reinterpret_cast<float*>(workspace);
  sums.col_partials = sums.row_partials + sums.col_tiles * out_features;
  sums.grid = dim3(grid_x(sums.col_tiles), grid_y(sums.row_tiles, op, "out_features"));
  return sums;
}

// The second pass: row_sums and col_sums from the partials, in a fixed order.
inline void sum_partials(const PartialSums& sums, std::uintptr_t row_sums, std::uintptr_t col_sums,
                         cudaStream_t stream, const char* op) {
  const std::int64_t total = static_cast<std::int64_t>(sums.out_features) + sums.in_features;
  sum_partials_kernel<<<grid_x(ceil_div(total, 256)), 256, 0, stream>>>(
      sums.row_partials, sums.out_features, static_cast<int>(sums.col_tiles), reinterpret_cast<float*>(row_sums),
      sums.col_partials, sums.in_features, static_cast<int>(sums.row_tiles), reinterpret_cast<float*>(col_sums));
  check_launch("sum_partials_kernel", op);
}

}  // namespace
}  // namespace loraprune
