// Fused LoRA-guided importance, reduced to per-row and per-column sums.
//
//   G = gB·(A − gA) + B·gA        (= gB·A + B·gA − gB·gA)
//   I = |G ⊙ (W + s·B·A)|         (or its square)
//
// One CTA owns a 64×128 tile of W. Its rank products G and P = B·A come from tensor-core
// mma.sync m16n8k8 TF32 on the rank-r factors staged in shared memory (16 ranks at a time, any
// r), while the W tile streams into shared memory with 16-byte cp.async; W is read exactly once
// and no out×in temporary exists. The epilogue forms I in registers and reduces it to the
// tile's row and column sums, which go to a workspace of per-tile partials; a second small
// kernel sums the partials in a fixed order, so results are bitwise reproducible (no atomics).
//
// Precision: the factors (A − gA, gA, A, gB, B) are rounded to TF32 (10-bit mantissa, relative
// error <= 2^-11 each) before the products, which accumulate in fp32; W is used exactly. Each
// element of G and of B·A is thus exact to about 2^-10 (1e-3) of the sum of its terms' magnitudes;
// the row/column sums average these errors further (measured against fp32 on random inputs,
// see tests/test_cuda_extension.py), far below what changes a ranking of structures. 3xTF32
// would buy fp32 accuracy at three times the tensor-core work if it were ever needed.

#include "cuda_utils.cuh"
#include "partial_sums.cuh"

namespace loraprune {
namespace {

constexpr const char* kOp = "lora_importance";

constexpr int kThreads = 256;
constexpr int kTileRows = 64;
constexpr int kTileCols = 128;
constexpr int kRankChunk = 16;                             // ranks staged per pass
constexpr int kWarpTileRows = 32;
constexpr int kWarpTileCols = 32;
constexpr int kWarpsAcross = kTileCols / kWarpTileCols;    // 4 warps side by side
constexpr int kWarpsDown = kTileRows / kWarpTileRows;      // 2 warps stacked
constexpr int kMmaRows = kWarpTileRows / 16;               // m16 tiles per warp
constexpr int kMmaCols = kWarpTileCols / 8;                // n8 tiles per warp
static_assert(kWarpsAcross * kWarpsDown * 32 == kThreads, "one warp per 32×32 sub-tile");
static_assert(kRankChunk % 8 == 0, "mma k-steps are 8 ranks");
static_assert(kTileRows * kRankChunk % kThreads == 0 && kRankChunk * kTileCols % kThreads == 0 &&
                  kTileRows * kTileCols % kThreads == 0,
              "staging loops make whole passes over the block");

// Padded pitches keep the fragment loads free of bank conflicts: row-factor fragments read
// lane (g, q) at word g·20 + q (32 distinct banks); column-factor fragments and W pairs read at
// q·136 + g (resp. g·136 + 2q); 136 elements also keep every W row 16-byte aligned for cp.async.
constexpr int kFactorPitch = kRankChunk + 4;
constexpr int kTilePitch = kTileCols + 8;

template <typename T>
struct SharedLayout {
  static constexpr int kWeightBytes = kTileRows * kTilePitch * static_cast<int>(sizeof(T));
  static constexpr int kLeftWords = kTileRows * kFactorPitch;   // one row factor chunk (tf32)
  static constexpr int kRightWords = kRankChunk * kTilePitch;   // one column factor chunk (tf32)
  static constexpr int kRowPartFloats = kWarpsAcross * kTileRows;
  static constexpr int kColPartFloats = kWarpsDown * kTileCols;
  static constexpr int kBytes =
      kWeightBytes + 4 * (2 * kLeftWords + 3 * kRightWords + kRowPartFloats + kColPartFloats);
};
static_assert(SharedLayout<float>::kWeightBytes % 16 == 0 && SharedLayout<__half>::kWeightBytes % 16 == 0,
              "the factor arrays follow the W tile");

struct ImportanceParams {
  const void* weight;
  std::int64_t weight_row_stride;
  int out_features;
  int in_features;
  const float* lora_a;   // rank × in
  const float* lora_b;   // out × rank
  const float* grad_a;   // rank × in
  const float* grad_b;   // out × rank
  int rank;
  float scaling;
  bool squared;
  bool vector_loads;     // W base, row stride and width allow 16-byte copies
  float* row_partials;   // [column tiles][out]
  float* col_partials;   // [row tiles][in]
};

__device__ __forceinline__ std::uint32_t to_tf32(float x) {
  std::uint32_t y;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(y) : "f"(x));
  return y;
}

// D += A·B for one 16×8×8 TF32 tile. Fragment ownership (lane = 4·g + q):
//   a[0] (g, q)  a[1] (g+8, q)  a[2] (g, q+4)  a[3] (g+8, q+4)       A is 16×8, row-major
//   b[0] (k=q, n=g)  b[1] (k=q+4, n=g)                                B is 8×8
//   d[0] (g, 2q)  d[1] (g, 2q+1)  d[2] (g+8, 2q)  d[3] (g+8, 2q+1)   D is 16×8
__device__ __forceinline__ void mma_tf32(float (&d)[4], const std::uint32_t (&a)[4], const std::uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void cp_async_16(void* shared_dst, const void* global_src) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(shared_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(global_src) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// Two adjacent W elements (an accumulator pair) as floats; the address is 4- or 8-byte aligned.
__device__ __forceinline__ float2 load_pair(const float* p) { return *reinterpret_cast<const float2*>(p); }
__device__ __forceinline__ float2 load_pair(const __half* p) {
  return __half22float2(*reinterpret_cast<const __half2*>(p));
}
__device__ __forceinline__ float2 load_pair(const __nv_bfloat16* p) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
}

template <typename T>
__device__ __forceinline__ void load_weight_tile(const ImportanceParams& p, T* w_tile, int row0, int col0) {
  const T* weight = static_cast<const T*>(p.weight);
  if (p.vector_loads) {
    constexpr int kVec = 16 / static_cast<int>(sizeof(T));
    constexpr int kChunksPerRow = kTileCols / kVec;
    // in_features is a multiple of kVec here, so a chunk that starts inside a row ends inside it.
    static_assert(kTileRows * kChunksPerRow % kThreads == 0, "whole passes");
#pragma unroll
    for (int pass = 0; pass < kTileRows * kChunksPerRow / kThreads; ++pass) {
      const int chunk = pass * kThreads + threadIdx.x;
      const int r = chunk / kChunksPerRow;
      const int c = (chunk % kChunksPerRow) * kVec;
      if (row0 + r < p.out_features && col0 + c < p.in_features) {
        cp_async_16(w_tile + r * kTilePitch + c,
                    weight + static_cast<std::int64_t>(row0 + r) * p.weight_row_stride + (col0 + c));
      }
    }
    cp_async_commit();
  } else {
#pragma unroll 4
    for (int pass = 0; pass < kTileRows * kTileCols / kThreads; ++pass) {
      const int e = pass * kThreads + threadIdx.x;
      const int r = e / kTileCols;
      const int c = e % kTileCols;
      if (row0 + r < p.out_features && col0 + c < p.in_features) {
        w_tile[r * kTilePitch + c] = weight[static_cast<std::int64_t>(row0 + r) * p.weight_row_stride + (col0 + c)];
      }
    }
  }
  // Elements outside W are left unset; the epilogue masks them.
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) lora_importance_kernel(const ImportanceParams p) {
  using Layout = SharedLayout<T>;
  extern __shared__ __align__(16) unsigned char shared[];
  T* w_tile = reinterpret_cast<T*>(shared);
  std::uint32_t* left_grad_b = reinterpret_cast<std::uint32_t*>(shared + Layout::kWeightBytes);
  std::uint32_t* left_b = left_grad_b + Layout::kLeftWords;
  std::uint32_t* right_diff = left_b + Layout::kLeftWords;  // A − gA
  std::uint32_t* right_grad_a = right_diff + Layout::kRightWords;
  std::uint32_t* right_a = right_grad_a + Layout::kRightWords;
  float* row_part = reinterpret_cast<float*>(right_a + Layout::kRightWords);  // [kWarpsAcross][kTileRows]
  float* col_part = row_part + Layout::kRowPartFloats;                        // [kWarpsDown][kTileCols]

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int group = lane >> 2;  // g of the fragment layouts
  const int quad = lane & 3;    // q of the fragment layouts
  const int warp_down = warp / kWarpsAcross;
  const int warp_across = warp % kWarpsAcross;
  const int warp_row0 = warp_down * kWarpTileRows;
  const int warp_col0 = warp_across * kWarpTileCols;
  const int row0 = blockIdx.y * kTileRows;
  const int col0 = blockIdx.x * kTileCols;

  // The W tile lands in shared memory while the rank products run.
  load_weight_tile(p, w_tile, row0, col0);

  float acc_grad[kMmaRows][kMmaCols][4] = {};   // G
  float acc_delta[kMmaRows][kMmaCols][4] = {};  // B·A
  for (int k0 = 0; k0 < p.rank; k0 += kRankChunk) {
    __syncthreads();  // every warp is done reading the previous chunk
    // Stage this rank chunk as TF32, zero outside the factors (zero ranks add nothing).
#pragma unroll
    for (int pass = 0; pass < kTileRows * kRankChunk / kThreads; ++pass) {
      const int e = pass * kThreads + tid;
      const int r = e / kRankChunk;
      const int k = e % kRankChunk;
      float gb = 0.f;
      float b = 0.f;
      if (row0 + r < p.out_features && k0 + k < p.rank) {
        const std::int64_t at = static_cast<std::int64_t>(row0 + r) * p.rank + (k0 + k);
        gb = p.grad_b[at];
        b = p.lora_b[at];
      }
      left_grad_b[r * kFactorPitch + k] = to_tf32(gb);
      left_b[r * kFactorPitch + k] = to_tf32(b);
    }
#pragma unroll
    for (int pass = 0; pass < kRankChunk * kTileCols / kThreads; ++pass) {
      const int e = pass * kThreads + tid;
      const int k = e / kTileCols;
      const int c = e % kTileCols;
      float a = 0.f;
      float ga = 0.f;
      if (k0 + k < p.rank && col0 + c < p.in_features) {
        const std::int64_t at = static_cast<std::int64_t>(k0 + k) * p.in_features + (col0 + c);
        a = p.lora_a[at];
        ga = p.grad_a[at];
      }
      right_diff[k * kTilePitch + c] = to_tf32(a - ga);
      right_grad_a[k * kTilePitch + c] = to_tf32(ga);
      right_a[k * kTilePitch + c] = to_tf32(a);
    }
    __syncthreads();

    const int steps = (min(kRankChunk, p.rank - k0) + 7) / 8;  // k-steps holding real ranks
#pragma unroll
    for (int step = 0; step < kRankChunk / 8; ++step) {
      if (step < steps) {
        const int kb = step * 8;
        std::uint32_t frag_grad_b[kMmaRows][4];
        std::uint32_t frag_b[kMmaRows][4];
#pragma unroll
        for (int mi = 0; mi < kMmaRows; ++mi) {
          const int at = (warp_row0 + mi * 16 + group) * kFactorPitch + kb + quad;
          frag_grad_b[mi][0] = left_grad_b[at];
          frag_grad_b[mi][1] = left_grad_b[at + 8 * kFactorPitch];
          frag_grad_b[mi][2] = left_grad_b[at + 4];
          frag_grad_b[mi][3] = left_grad_b[at + 8 * kFactorPitch + 4];
          frag_b[mi][0] = left_b[at];
          frag_b[mi][1] = left_b[at + 8 * kFactorPitch];
          frag_b[mi][2] = left_b[at + 4];
          frag_b[mi][3] = left_b[at + 8 * kFactorPitch + 4];
        }
#pragma unroll
        for (int ni = 0; ni < kMmaCols; ++ni) {
          const int at = (kb + quad) * kTilePitch + warp_col0 + ni * 8 + group;
          const std::uint32_t frag_diff[2] = {right_diff[at], right_diff[at + 4 * kTilePitch]};
          const std::uint32_t frag_grad_a[2] = {right_grad_a[at], right_grad_a[at + 4 * kTilePitch]};
          const std::uint32_t frag_a[2] = {right_a[at], right_a[at + 4 * kTilePitch]};
#pragma unroll
          for (int mi = 0; mi < kMmaRows; ++mi) {
            mma_tf32(acc_grad[mi][ni], frag_grad_b[mi], frag_diff);
            mma_tf32(acc_grad[mi][ni], frag_b[mi], frag_grad_a);
            mma_tf32(acc_delta[mi][ni], frag_b[mi], frag_a);
          }
        }
      }
    }
  }

  if (p.vector_loads) {
    cp_async_wait_all();
  }
  __syncthreads();  // the W tile (cp.async or plain stores) is visible to every thread

  // Importance of this thread's accumulator elements, summed per row and per column.
  float row_sum[kMmaRows][2] = {};  // rows g and g+8 of each m16 tile
  float col_sum[kMmaCols][2] = {};  // columns 2q and 2q+1 of each n8 tile
#pragma unroll
  for (int mi = 0; mi < kMmaRows; ++mi) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = warp_row0 + mi * 16 + half * 8 + group;
      const bool row_inside = row0 + r < p.out_features;
#pragma unroll
      for (int ni = 0; ni < kMmaCols; ++ni) {
        const int c = warp_col0 + ni * 8 + 2 * quad;
        const float2 w = load_pair(w_tile + r * kTilePitch + c);
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float merged = (e == 0 ? w.x : w.y) + p.scaling * acc_delta[mi][ni][2 * half + e];
          float v = acc_grad[mi][ni][2 * half + e] * merged;
          v = p.squared ? v * v : fabsf(v);
          // select, not multiply: unset shared memory outside W may hold NaN
          v = (row_inside && col0 + c + e < p.in_features) ? v : 0.f;
          row_sum[mi][half] += v;
          col_sum[ni][e] += v;
        }
      }
    }
  }

  // Rows: reduce over the 4 lanes (q) sharing a row; columns: over the 8 lanes (g) sharing one.
#pragma unroll
  for (int mi = 0; mi < kMmaRows; ++mi) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float v = row_sum[mi][half];
      v += __shfl_xor_sync(0xffffffffu, v, 1);
      v += __shfl_xor_sync(0xffffffffu, v, 2);
      if (quad == 0) {
        row_part[warp_across * kTileRows + warp_row0 + mi * 16 + half * 8 + group] = v;
      }
    }
  }
#pragma unroll
  for (int ni = 0; ni < kMmaCols; ++ni) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float v = col_sum[ni][e];
      v += __shfl_xor_sync(0xffffffffu, v, 4);
      v += __shfl_xor_sync(0xffffffffu, v, 8);
      v += __shfl_xor_sync(0xffffffffu, v, 16);
      if (group == 0) {
        col_part[warp_down * kTileCols + warp_col0 + ni * 8 + 2 * quad + e] = v;
      }
    }
  }
  __syncthreads();

  // Combine the warps in a fixed order and publish this tile's partial sums.
  if (tid < kTileRows && row0 + tid < p.out_features) {
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kWarpsAcross; ++w) {
      v += row_part[w * kTileRows + tid];
    }
    p.row_partials[static_cast<std::int64_t>(blockIdx.x) * p.out_features + (row0 + tid)] = v;
  }
  if (tid < kTileCols && col0 + tid < p.in_features) {
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kWarpsDown; ++w) {
      v += col_part[w * kTileCols + tid];
    }
    p.col_partials[static_cast<std::int64_t>(blockIdx.y) * p.in_features + (col0 + tid)] = v;
  }
}

template <typename T>
void launch_importance(ImportanceParams params, std::uintptr_t weight, dim3 grid, cudaStream_t stream) {
  constexpr int kElement = static_cast<int>(sizeof(T));
  params.vector_loads = weight % 16 == 0 && (params.weight_row_stride * kElement) % 16 == 0 &&
                        (static_cast<std::int64_t>(params.in_features) * kElement) % 16 == 0;
  constexpr int kSharedBytes = SharedLayout<T>::kBytes;
  LORAPRUNE_CUDA_CHECK(cudaFuncSetAttribute(lora_importance_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            kSharedBytes),
                       kOp);
  lora_importance_kernel<T><<<grid, kThreads, kSharedBytes, stream>>>(params);
  check_launch("lora_importance_kernel", kOp);
}

}  // namespace

std::int64_t lora_importance_workspace_floats(std::int64_t out_features, std::int64_t in_features) {
  require(out_features >= 0 && in_features >= 0, "loraprune._C.lora_importance_workspace_floats: negative size");
  return ceil_div(in_features, kTileCols) * out_features + ceil_div(out_features, kTileRows) * in_features;
}

void lora_importance(const LaunchContext& ctx, std::uintptr_t weight, DType weight_dtype, std::int64_t out_features,
                     std::int64_t in_features, std::int64_t weight_row_stride, std::uintptr_t lora_a,
                     std::uintptr_t lora_b, std::uintptr_t grad_a, std::uintptr_t grad_b, std::int64_t rank,
                     double scaling, bool squared, std::uintptr_t row_sums, std::uintptr_t col_sums,
                     std::uintptr_t workspace, std::int64_t workspace_floats) {
  const std::string where = std::string("loraprune._C.") + kOp + ": ";
  require(out_features >= 0 && out_features <= kInt32Max && in_features >= 0 && in_features <= kInt32Max,
          where + "out_features and in_features must lie in [0, 2^31)");
  require(rank >= 1 && rank <= kInt32Max, where + "rank must be >= 1");
  require(is_dtype_code(weight_dtype),
          where + "unknown weight dtype code " + std::to_string(static_cast<int>(weight_dtype)));
  require(weight_row_stride >= 0, where + "weight_row_stride must be >= 0");
  require(workspace_floats >= lora_importance_workspace_floats(out_features, in_features),
          where + "workspace is smaller than lora_importance_workspace_floats(out_features, in_features)");
  require(row_sums != 0 || out_features == 0, where + "row_sums is a null pointer");
  require(col_sums != 0 || in_features == 0, where + "col_sums is a null pointer");
  const bool empty = out_features == 0 || in_features == 0;
  require(empty || (weight != 0 && lora_a != 0 && lora_b != 0 && grad_a != 0 && grad_b != 0 && workspace != 0),
          where + "null input pointer");
  const cudaStream_t stream = as_stream(ctx.stream);
  DeviceGuard guard(ctx.device, kOp);
  if (empty) {
    if (out_features > 0) {
      LORAPRUNE_CUDA_CHECK(cudaMemsetAsync(reinterpret_cast<void*>(row_sums), 0, out_features * sizeof(float), stream),
                           kOp);
    }
    if (in_features > 0) {
      LORAPRUNE_CUDA_CHECK(cudaMemsetAsync(reinterpret_cast<void*>(col_sums), 0, in_features * sizeof(float), stream),
                           kOp);
    }
    return;
  }

  const std::int64_t col_tiles = ceil_div(in_features, kTileCols);
  const std::int64_t row_tiles = ceil_div(out_features, kTileRows);
  const dim3 grid(grid_x(col_tiles), grid_y(row_tiles, kOp, "out_features"));
  float* row_partials = reinterpret_cast<float*>(workspace);
  float* col_partials = row_partials + col_tiles * out_features;

  ImportanceParams params{};
  params.weight = reinterpret_cast<const void*>(weight);
  params.weight_row_stride = weight_row_stride;
  params.out_features = static_cast<int>(out_features);
  params.in_features = static_cast<int>(in_features);
  params.lora_a = reinterpret_cast<const float*>(lora_a);
  params.lora_b = reinterpret_cast<const float*>(lora_b);
  params.grad_a = reinterpret_cast<const float*>(grad_a);
  params.grad_b = reinterpret_cast<const float*>(grad_b);
  params.rank = static_cast<int>(rank);
  params.scaling = static_cast<float>(scaling);
  params.squared = squared;
  params.row_partials = row_partials;
  params.col_partials = col_partials;
  dispatch_dtype(weight_dtype, kOp, [&](auto element) {
    launch_importance<decltype(element)>(params, weight, grid, stream);
  });

  const std::int64_t total = out_features + in_features;
  sum_partials_kernel<<<grid_x(ceil_div(total, 256)), 256, 0, stream>>>(
      row_partials, params.out_features, static_cast<int>(col_tiles), reinterpret_cast<float*>(row_sums),
      col_partials, params.in_features, static_cast<int>(row_tiles), reinterpret_cast<float*>(col_sums));
  check_launch("sum_partials_kernel", kOp);
}

}  // namespace loraprune
