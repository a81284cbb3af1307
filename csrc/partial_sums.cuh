// The second pass of the importance kernels' deterministic reduction: per-tile partial sums,
// written with plain stores by the first kernel, are added here in a fixed order (no atomics).
#pragma once

#include <cstdint>

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

}  // namespace
}  // namespace loraprune
