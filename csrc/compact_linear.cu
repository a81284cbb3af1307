// Compaction gather-merge: out = (W + s·B·A)[rows][:, cols] in one pass, written densely in
// W's dtype. Each CTA owns a 32×64 tile of the output: it gathers its rows of B and columns of
// A into shared memory (32 ranks at a time, any rank) and accumulates s·(B·A) in fp32 with plain
// FMAs (this runs once per pruning, and fp32 keeps the merge as exact as the reference), then
// adds the gathered W element and rounds once to W's dtype.

#include "cuda_utils.cuh"

namespace loraprune {
namespace {

constexpr const char* kOp = "compact_linear";
constexpr int kThreads = 256;
constexpr int kTileRows = 32;
constexpr int kTileCols = 64;                               // one output column per thread
constexpr int kRankChunk = 32;
constexpr int kRowStep = kThreads / kTileCols;              // 4 thread rows
constexpr int kRowsPerThread = kTileRows / kRowStep;        // 8 output rows per thread
static_assert(kTileRows * kRankChunk % kThreads == 0 && kRankChunk * kTileCols % kThreads == 0,
              "staging loops make whole passes over the block");

struct CompactParams {
  const void* weight;
  std::int64_t weight_row_stride;
  std::int64_t in_features;
  const float* lora_a;  // rank × in
  const float* lora_b;  // out × rank
  int rank;             // 0: no LoRA
  float scaling;
  const std::int64_t* rows;  // nullptr: identity
  std::int64_t num_rows;
  const std::int64_t* cols;  // nullptr: identity
  std::int64_t num_cols;
  void* out;            // num_rows × num_cols, row-major
};

template <typename T>
__global__ void __launch_bounds__(kThreads) compact_linear_kernel(const CompactParams p) {
  __shared__ float b_chunk[kTileRows][kRankChunk];  // rows of B for this tile's source rows
  __shared__ float a_chunk[kRankChunk][kTileCols];  // columns of A for this tile's source columns
  __shared__ std::int64_t source_rows[kTileRows];   // -1 past the end of the output
  __shared__ std::int64_t source_cols[kTileCols];

  const int tid = threadIdx.x;
  const int tx = tid % kTileCols;
  const int ty = tid / kTileCols;
  const std::int64_t out_row0 = static_cast<std::int64_t>(blockIdx.y) * kTileRows;
  const std::int64_t out_col0 = static_cast<std::int64_t>(blockIdx.x) * kTileCols;

  if (tid < kTileRows) {
    const std::int64_t i = out_row0 + tid;
    source_rows[tid] = i < p.num_rows ? (p.rows != nullptr ? p.rows[i] : i) : -1;
  }
  if (tid < kTileCols) {
    const std::int64_t j = out_col0 + tid;
    source_cols[tid] = j < p.num_cols ? (p.cols != nullptr ? p.cols[j] : j) : -1;
  }
  __syncthreads();

  float acc[kRowsPerThread] = {};
  for (int k0 = 0; k0 < p.rank; k0 += kRankChunk) {
#pragma unroll
    for (int pass = 0; pass < kTileRows * kRankChunk / kThreads; ++pass) {
      const int e = pass * kThreads + tid;
      const int r = e / kRankChunk;
      const int k = e % kRankChunk;
      const std::int64_t src = source_rows[r];
      b_chunk[r][k] = (src >= 0 && k0 + k < p.rank) ? p.lora_b[src * p.rank + (k0 + k)] : 0.f;
    }
#pragma unroll
    for (int pass = 0; pass < kRankChunk * kTileCols / kThreads; ++pass) {
      const int e = pass * kThreads + tid;
      const int k = e / kTileCols;
      const int c = e % kTileCols;
      const std::int64_t src = source_cols[c];
      a_chunk[k][c] = (src >= 0 && k0 + k < p.rank) ? p.lora_a[static_cast<std::int64_t>(k0 + k) * p.in_features + src]
                                                    : 0.f;
    }
    __syncthreads();
    const int ranks = min(kRankChunk, p.rank - k0);
    for (int k = 0; k < ranks; ++k) {
      const float a = a_chunk[k][tx];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        acc[i] = fmaf(b_chunk[ty + i * kRowStep][k], a, acc[i]);  // b_chunk read is a warp broadcast
      }
    }
    __syncthreads();  // before the next chunk overwrites the factors
  }

  const T* weight = static_cast<const T*>(p.weight);
  T* out = static_cast<T*>(p.out);
  const std::int64_t src_col = source_cols[tx];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int r = ty + i * kRowStep;
    const std::int64_t src_row = source_rows[r];
    if (src_row >= 0 && src_col >= 0) {
      const float w = to_float(weight[src_row * p.weight_row_stride + src_col]);
      const float merged = p.rank > 0 ? fmaf(p.scaling, acc[i], w) : w;  // no LoRA: an exact copy
      out[(out_row0 + r) * p.num_cols + (out_col0 + tx)] = from_float<T>(merged);
    }
  }
}

}  // namespace

void compact_linear(const LaunchContext& ctx, std::uintptr_t weight, DType weight_dtype, std::int64_t out_features,
                    std::int64_t in_features, std::int64_t weight_row_stride, std::uintptr_t lora_a,
                    std::uintptr_t lora_b, std::int64_t rank, double scaling, std::uintptr_t rows,
                    std::int64_t num_rows, std::uintptr_t cols, std::int64_t num_cols, std::uintptr_t out) {
  const std::string where = std::string("loraprune._C.") + kOp + ": ";
  require(out_features >= 0 && in_features >= 0, where + "negative size");
  require(rank >= 0 && rank <= kInt32Max, where + "rank must lie in [0, 2^31)");
  require(is_dtype_code(weight_dtype),
          where + "unknown weight dtype code " + std::to_string(static_cast<int>(weight_dtype)));
  require(weight_row_stride >= 0, where + "weight_row_stride must be >= 0");
  require(num_rows >= 0 && num_cols >= 0, where + "num_rows and num_cols must be >= 0");
  require(rows != 0 || num_rows == out_features, where + "without rows, num_rows must equal out_features");
  require(cols != 0 || num_cols == in_features, where + "without cols, num_cols must equal in_features");
  if (num_rows == 0 || num_cols == 0) {
    return;
  }
  require(weight != 0 && out != 0, where + "null weight or out pointer");
  require(rank == 0 || (lora_a != 0 && lora_b != 0), where + "null lora_a or lora_b pointer");

  const dim3 grid(grid_x(ceil_div(num_cols, kTileCols)), grid_y(ceil_div(num_rows, kTileRows), kOp, "the kept rows"));
  CompactParams params{};
  params.weight = reinterpret_cast<const void*>(weight);
  params.weight_row_stride = weight_row_stride;
  params.in_features = in_features;
  params.lora_a = reinterpret_cast<const float*>(lora_a);
  params.lora_b = reinterpret_cast<const float*>(lora_b);
  params.rank = static_cast<int>(rank);
  params.scaling = static_cast<float>(scaling);
  params.rows = reinterpret_cast<const std::int64_t*>(rows);
  params.num_rows = num_rows;
  params.cols = reinterpret_cast<const std::int64_t*>(cols);
  params.num_cols = num_cols;
  params.out = reinterpret_cast<void*>(out);

  const cudaStream_t stream = as_stream(ctx.stream);
  DeviceGuard guard(ctx.device, kOp);
  dispatch_dtype(weight_dtype, kOp, [&](auto element) {
    compact_linear_kernel<decltype(element)><<<grid, kThreads, 0, stream>>>(params);
    check_launch("compact_linear_kernel", kOp);
  });
}

}  // namespace loraprune
