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
// W is a template argument (weight_tiles.cuh): dense fp32/fp16/bf16, or int8 / packed 4-bit
// codes as bitsandbytes holds them, staged packed and dequantized on the way from shared memory
// into registers (the packed W is read once). Factor staging is the other: single buffer (each
// chunk converted to TF32 on its way into shared memory, between two barriers, while the MMAs
// wait) or double buffer (cp.async of the raw float32 factors into two alternating stages: the
// next chunk loads while this one multiplies, converted to TF32 per fragment). The factors are
// re-staged for every tile, so their traffic grows with the rank (0.75× the bf16 W traffic at
// r = 8, 6× at r = 64); which staging is faster waits for a GPU (LORAPRUNE_CUDA_FACTOR_STAGING).
//
// Precision: the factors (A − gA, gA, A, gB, B) are rounded to TF32 (10-bit mantissa, relative
// error <= 2^-11 each) before the products, which accumulate in fp32; W is used exactly. Each
// element of G and of B·A is thus exact to about 2^-10 (1e-3) of the sum of its terms' magnitudes;
// the row/column sums average these errors further (measured against fp32 on random inputs,
// see tests/test_cuda_extension.py), far below what changes a ranking of structures. 3xTF32
// would buy fp32 accuracy at three times the tensor-core work if it were ever needed.

#include "cuda_utils.cuh"
#include "partial_sums.cuh"
#include "weight_tiles.cuh"

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
// lane (g, q) at word g·20 + q (32 distinct banks); column-factor fragments read at q·136 + g.
constexpr int kFactorPitch = kRankChunk + 4;
constexpr int kFactorColPitch = kTileCols + 8;

template <typename T>
using DenseWeightTile = DenseTile<T, kTileRows, kTileCols, kThreads>;
using Int8WeightTile = Int8Tile<kTileRows, kTileCols, kThreads>;
using FourBitWeightTile = FourBitTile<kTileRows, kTileCols, kThreads>;

constexpr int kLeftWords = kTileRows * kFactorPitch;     // one row factor chunk
constexpr int kRightWords = kRankChunk * kFactorColPitch;  // one column factor chunk
constexpr int kPartFloats = kWarpsAcross * kTileRows + kWarpsDown * kTileCols;

// Shared memory after the staged W tile: the factor chunks, then the warps' partial sums.
// Single buffer: gB, B, A − gA, gA, A converted to TF32 (5 arrays). Double buffer: two stages of
// the raw float32 gB, B, A, gA (4 arrays each), copied by cp.async and converted when read.
template <bool kDoubleBuffer>
constexpr int kFactorWords = kDoubleBuffer ? 2 * (2 * kLeftWords + 2 * kRightWords) : 2 * kLeftWords + 3 * kRightWords;

template <typename Tile, bool kDoubleBuffer>
constexpr int kSharedBytes = Tile::kBytes + 4 * (kFactorWords<kDoubleBuffer> + kPartFloats);

struct ImportanceParams {
  WeightSource weight;
  const float* lora_a;   // rank × in
  const float* lora_b;   // out × rank
  const float* grad_a;   // rank × in
  const float* grad_b;   // out × rank
  int rank;
  float scaling;
  bool squared;
  bool vector_loads;     // W base, row stride and width allow 16-byte copies
  bool vector_factors;   // rank and in_features are multiples of 4: 16-byte factor copies
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

// One rank chunk's factors in shared memory, as the MMA loop reads them. Single buffer: TF32 words
// (A − gA precomputed); double buffer: raw floats, converted (and A − gA formed) per fragment.
struct FactorChunk {
  const std::uint32_t* left_grad_b;  // [kTileRows][kFactorPitch]
  const std::uint32_t* left_b;
  const std::uint32_t* right_diff;   // [kRankChunk][kFactorColPitch]; single buffer only
  const std::uint32_t* right_grad_a;
  const std::uint32_t* right_a;
};

template <bool kRaw>
__device__ __forceinline__ std::uint32_t factor_word(const std::uint32_t* array, int at) {
  return kRaw ? to_tf32(__uint_as_float(array[at])) : array[at];
}

// acc_grad += gB·(A − gA) + B·gA and acc_delta += B·A over one staged rank chunk.
template <bool kRaw>
__device__ __forceinline__ void multiply_chunk(const FactorChunk& f, int ranks, int warp_row0, int warp_col0,
                                               int group, int quad, float (&acc_grad)[kMmaRows][kMmaCols][4],
                                               float (&acc_delta)[kMmaRows][kMmaCols][4]) {
  const int steps = (ranks + 7) / 8;  // k-steps holding real ranks
#pragma unroll
  for (int step = 0; step < kRankChunk / 8; ++step) {
    if (step < steps) {
      const int kb = step * 8;
      std::uint32_t frag_grad_b[kMmaRows][4];
      std::uint32_t frag_b[kMmaRows][4];
#pragma unroll
      for (int mi = 0; mi < kMmaRows; ++mi) {
        const int at = (warp_row0 + mi * 16 + group) * kFactorPitch + kb + quad;
        const int offsets[4] = {0, 8 * kFactorPitch, 4, 8 * kFactorPitch + 4};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          frag_grad_b[mi][j] = factor_word<kRaw>(f.left_grad_b, at + offsets[j]);
          frag_b[mi][j] = factor_word<kRaw>(f.left_b, at + offsets[j]);
        }
      }
#pragma unroll
      for (int ni = 0; ni < kMmaCols; ++ni) {
        const int at = (kb + quad) * kFactorColPitch + warp_col0 + ni * 8 + group;
        std::uint32_t frag_diff[2];
        std::uint32_t frag_grad_a[2];
        std::uint32_t frag_a[2];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int k_at = at + j * 4 * kFactorColPitch;
          if constexpr (kRaw) {
            const float a = __uint_as_float(f.right_a[k_at]);
            const float ga = __uint_as_float(f.right_grad_a[k_at]);
            frag_diff[j] = to_tf32(a - ga);
            frag_grad_a[j] = to_tf32(ga);
            frag_a[j] = to_tf32(a);
          } else {
            frag_diff[j] = f.right_diff[k_at];
            frag_grad_a[j] = f.right_grad_a[k_at];
            frag_a[j] = f.right_a[k_at];
          }
        }
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

// Single buffer: stage rank chunk k0 as TF32, zero outside the factors (zero ranks add nothing).
__device__ __forceinline__ void stage_converted(const ImportanceParams& p, int k0, int row0, int col0,
                                                std::uint32_t* left_grad_b, std::uint32_t* left_b,
                                                std::uint32_t* right_diff, std::uint32_t* right_grad_a,
                                                std::uint32_t* right_a) {
  const int tid = threadIdx.x;
#pragma unroll
  for (int pass = 0; pass < kTileRows * kRankChunk / kThreads; ++pass) {
    const int e = pass * kThreads + tid;
    const int r = e / kRankChunk;
    const int k = e % kRankChunk;
    float gb = 0.f;
    float b = 0.f;
    if (row0 + r < p.weight.out_features && k0 + k < p.rank) {
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
    if (k0 + k < p.rank && col0 + c < p.weight.in_features) {
      const std::int64_t at = static_cast<std::int64_t>(k0 + k) * p.weight.in_features + (col0 + c);
      a = p.lora_a[at];
      ga = p.grad_a[at];
    }
    right_diff[k * kFactorColPitch + c] = to_tf32(a - ga);
    right_grad_a[k * kFactorColPitch + c] = to_tf32(ga);
    right_a[k * kFactorColPitch + c] = to_tf32(a);
  }
}

// Double buffer: copy rank chunk k0 of the raw factors with cp.async (zero-filled outside them) and
// commit it as one group. 16-byte copies when rank and in_features are multiples of 4 (then every
// copied run of 4 floats is 16-byte aligned), else 4-byte copies.
__device__ __forceinline__ void stage_async(const ImportanceParams& p, int k0, int row0, int col0, float* left_grad_b,
                                            float* left_b, float* right_a, float* right_grad_a) {
  const int tid = threadIdx.x;
  const int out_features = p.weight.out_features;
  const int in_features = p.weight.in_features;
  if (p.vector_factors) {
    constexpr int kLeftChunks = kTileRows * kRankChunk / 4;   // runs of 4 ranks of a row
    constexpr int kRightChunks = kRankChunk * kTileCols / 4;  // runs of 4 columns of a rank
    static_assert(kLeftChunks % kThreads == 0 && kRightChunks % kThreads == 0, "whole passes");
#pragma unroll
    for (int pass = 0; pass < kLeftChunks / kThreads; ++pass) {
      const int chunk = pass * kThreads + tid;
      const int r = chunk / (kRankChunk / 4);
      const int k = (chunk % (kRankChunk / 4)) * 4;
      const bool inside = row0 + r < out_features && k0 + k < p.rank;
      const int bytes = inside ? 4 * min(4, p.rank - (k0 + k)) : 0;
      const std::int64_t at = inside ? static_cast<std::int64_t>(row0 + r) * p.rank + (k0 + k) : 0;
      cp_async_16_zfill(left_grad_b + r * kFactorPitch + k, p.grad_b + at, bytes);
      cp_async_16_zfill(left_b + r * kFactorPitch + k, p.lora_b + at, bytes);
    }
#pragma unroll
    for (int pass = 0; pass < kRightChunks / kThreads; ++pass) {
      const int chunk = pass * kThreads + tid;
      const int k = chunk / (kTileCols / 4);
      const int c = (chunk % (kTileCols / 4)) * 4;
      const bool inside = k0 + k < p.rank && col0 + c < in_features;
      const int bytes = inside ? 4 * min(4, in_features - (col0 + c)) : 0;
      const std::int64_t at = inside ? static_cast<std::int64_t>(k0 + k) * in_features + (col0 + c) : 0;
      cp_async_16_zfill(right_a + k * kFactorColPitch + c, p.lora_a + at, bytes);
      cp_async_16_zfill(right_grad_a + k * kFactorColPitch + c, p.grad_a + at, bytes);
    }
  } else {
#pragma unroll 4
    for (int pass = 0; pass < kTileRows * kRankChunk / kThreads; ++pass) {
      const int e = pass * kThreads + tid;
      const int r = e / kRankChunk;
      const int k = e % kRankChunk;
      const bool inside = row0 + r < out_features && k0 + k < p.rank;
      const std::int64_t at = inside ? static_cast<std::int64_t>(row0 + r) * p.rank + (k0 + k) : 0;
      cp_async_4_zfill(left_grad_b + r * kFactorPitch + k, p.grad_b + at, inside ? 4 : 0);
      cp_async_4_zfill(left_b + r * kFactorPitch + k, p.lora_b + at, inside ? 4 : 0);
    }
#pragma unroll 4
    for (int pass = 0; pass < kRankChunk * kTileCols / kThreads; ++pass) {
      const int e = pass * kThreads + tid;
      const int k = e / kTileCols;
      const int c = e % kTileCols;
      const bool inside = k0 + k < p.rank && col0 + c < in_features;
      const std::int64_t at = inside ? static_cast<std::int64_t>(k0 + k) * in_features + (col0 + c) : 0;
      cp_async_4_zfill(right_a + k * kFactorColPitch + c, p.lora_a + at, inside ? 4 : 0);
      cp_async_4_zfill(right_grad_a + k * kFactorColPitch + c, p.grad_a + at, inside ? 4 : 0);
    }
  }
  cp_async_commit();
}

template <typename Tile, bool kDoubleBuffer>
__global__ void __launch_bounds__(kThreads, 2) lora_importance_kernel(const ImportanceParams p) {
  extern __shared__ __align__(16) unsigned char shared[];
  unsigned char* w_tile = shared;
  std::uint32_t* factors = reinterpret_cast<std::uint32_t*>(shared + Tile::kBytes);
  float* row_part = reinterpret_cast<float*>(factors + kFactorWords<kDoubleBuffer>);  // [kWarpsAcross][kTileRows]
  float* col_part = row_part + kWarpsAcross * kTileRows;                            // [kWarpsDown][kTileCols]

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
  const int in_features = p.weight.in_features;

  float acc_grad[kMmaRows][kMmaCols][4] = {};   // G
  float acc_delta[kMmaRows][kMmaCols][4] = {};  // B·A
  if constexpr (kDoubleBuffer) {
    // Stage s of the factors: gB, B (left), A, gA (right), raw float32.
    const auto stage_arrays = [&](int s, int k0, bool issue) {
      std::uint32_t* base = factors + s * (2 * kLeftWords + 2 * kRightWords);
      FactorChunk chunk{base, base + kLeftWords, nullptr, base + 2 * kLeftWords + kRightWords,
                        base + 2 * kLeftWords};
      if (issue) {
        stage_async(p, k0, row0, col0, reinterpret_cast<float*>(base), reinterpret_cast<float*>(base + kLeftWords),
                    reinterpret_cast<float*>(base + 2 * kLeftWords),
                    reinterpret_cast<float*>(base + 2 * kLeftWords + kRightWords));
      }
      return chunk;
    };
    // cp.async groups in issue order: chunk 0, the W tile, then one per further chunk.
    stage_arrays(0, 0, true);
    Tile::stage(p.weight, p.vector_loads, w_tile, row0, col0);
    for (int k0 = 0, s = 0; k0 < p.rank; k0 += kRankChunk, s ^= 1) {
      const bool more = k0 + kRankChunk < p.rank;
      if (k0 > 0) {
        __syncthreads();  // every warp is done reading the stage the next chunk overwrites
      }
      if (more) {
        stage_arrays(s ^ 1, k0 + kRankChunk, true);
      }
      // Groups allowed in flight: the next chunk, and the W tile while the first chunk multiplies.
      cp_async_wait((more ? 1 : 0) + (k0 == 0 ? 1 : 0));
      __syncthreads();  // this chunk is visible to every thread
      multiply_chunk<true>(stage_arrays(s, k0, false), min(kRankChunk, p.rank - k0), warp_row0, warp_col0, group,
                           quad, acc_grad, acc_delta);
    }
  } else {
    std::uint32_t* left_grad_b = factors;
    std::uint32_t* left_b = left_grad_b + kLeftWords;
    std::uint32_t* right_diff = left_b + kLeftWords;  // A − gA
    std::uint32_t* right_grad_a = right_diff + kRightWords;
    std::uint32_t* right_a = right_grad_a + kRightWords;
    // The W tile lands in shared memory while the rank products run.
    Tile::stage(p.weight, p.vector_loads, w_tile, row0, col0);
    for (int k0 = 0; k0 < p.rank; k0 += kRankChunk) {
      __syncthreads();  // every warp is done reading the previous chunk
      stage_converted(p, k0, row0, col0, left_grad_b, left_b, right_diff, right_grad_a, right_a);
      __syncthreads();
      multiply_chunk<false>(FactorChunk{left_grad_b, left_b, right_diff, right_grad_a, right_a},
                            min(kRankChunk, p.rank - k0), warp_row0, warp_col0, group, quad, acc_grad, acc_delta);
    }
  }

  cp_async_wait(0);
  __syncthreads();  // the W tile (cp.async or plain stores) is visible to every thread

  // Importance of this thread's accumulator elements, summed per row and per column.
  float row_sum[kMmaRows][2] = {};  // rows g and g+8 of each m16 tile
  float col_sum[kMmaCols][2] = {};  // columns 2q and 2q+1 of each n8 tile
#pragma unroll
  for (int mi = 0; mi < kMmaRows; ++mi) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = warp_row0 + mi * 16 + half * 8 + group;
      const bool row_inside = row0 + r < p.weight.out_features;
#pragma unroll
      for (int ni = 0; ni < kMmaCols; ++ni) {
        const int c = warp_col0 + ni * 8 + 2 * quad;
        const float2 w = Tile::pair(p.weight, w_tile, r, c, row0, col0);
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float merged = (e == 0 ? w.x : w.y) + p.scaling * acc_delta[mi][ni][2 * half + e];
          float v = acc_grad[mi][ni][2 * half + e] * merged;
          v = p.squared ? v * v : fabsf(v);
          // select, not multiply: unset shared memory outside W may hold NaN
          v = (row_inside && col0 + c + e < in_features) ? v : 0.f;
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
  if (tid < kTileRows && row0 + tid < p.weight.out_features) {
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kWarpsAcross; ++w) {
      v += row_part[w * kTileRows + tid];
    }
    p.row_partials[static_cast<std::int64_t>(blockIdx.x) * p.weight.out_features + (row0 + tid)] = v;
  }
  if (tid < kTileCols && col0 + tid < in_features) {
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kWarpsDown; ++w) {
      v += col_part[w * kTileCols + tid];
    }
    p.col_partials[static_cast<std::int64_t>(blockIdx.y) * in_features + (col0 + tid)] = v;
  }
}

template <typename Tile, bool kDoubleBuffer>
void launch_tile(const ImportanceParams& params, dim3 grid, cudaStream_t stream) {
  constexpr int kBytes = kSharedBytes<Tile, kDoubleBuffer>;
  const auto kernel = lora_importance_kernel<Tile, kDoubleBuffer>;
  LORAPRUNE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes), kOp);
  kernel<<<grid, kThreads, kBytes, stream>>>(params);
  check_launch("lora_importance_kernel", kOp);
}

template <typename Tile>
void launch_staging(const ImportanceParams& params, bool double_buffer, dim3 grid, cudaStream_t stream) {
  if (double_buffer) {
    launch_tile<Tile, true>(params, grid, stream);
  } else {
    launch_tile<Tile, false>(params, grid, stream);
  }
}

}  // namespace

std::int64_t lora_importance_workspace_floats(std::int64_t out_features, std::int64_t in_features) {
  require(out_features >= 0 && in_features >= 0, "loraprune._C.lora_importance_workspace_floats: negative size");
  return partial_sums_floats(out_features, in_features, kTileRows, kTileCols);
}

void lora_importance(const LaunchContext& ctx, std::uintptr_t weight, DType weight_dtype, std::int64_t out_features,
                     std::int64_t in_features, std::int64_t weight_row_stride, std::uintptr_t lora_a,
                     std::uintptr_t lora_b, std::uintptr_t grad_a, std::uintptr_t grad_b, std::int64_t rank,
                     double scaling, bool squared, std::uintptr_t row_sums, std::uintptr_t col_sums,
                     std::uintptr_t workspace, std::int64_t workspace_floats, const QuantizedWeightArgs& quantized,
                     bool double_buffer) {
  const std::string where = std::string("loraprune._C.") + kOp + ": ";
  check_importance_outputs(where, out_features, in_features, row_sums, col_sums, workspace, workspace_floats,
                           kTileRows, kTileCols, "lora_importance_workspace_floats");
  require(rank >= 1 && rank <= kInt32Max, where + "rank must be >= 1");
  ImportanceParams params{};
  params.weight = weight_source(where, weight, weight_dtype, out_features, in_features, weight_row_stride, quantized);
  const bool empty = out_features == 0 || in_features == 0;
  require(empty || (weight != 0 && lora_a != 0 && lora_b != 0 && grad_a != 0 && grad_b != 0),
          where + "null input pointer");
  const cudaStream_t stream = as_stream(ctx.stream);
  DeviceGuard guard(ctx.device, kOp);
  if (zero_sums_if_empty(empty, out_features, in_features, row_sums, col_sums, stream, kOp)) {
    return;
  }

  const PartialSums sums = partial_sums(workspace, out_features, in_features, kTileRows, kTileCols, kOp);
  params.lora_a = reinterpret_cast<const float*>(lora_a);
  params.lora_b = reinterpret_cast<const float*>(lora_b);
  params.grad_a = reinterpret_cast<const float*>(grad_a);
  params.grad_b = reinterpret_cast<const float*>(grad_b);
  params.rank = static_cast<int>(rank);
  params.scaling = static_cast<float>(scaling);
  params.squared = squared;
  params.vector_loads = weight_vector_loads(params.weight, weight);
  params.vector_factors = rank % 4 == 0 && in_features % 4 == 0 &&
                          (lora_a | lora_b | grad_a | grad_b) % 16 == 0;
  params.row_partials = sums.row_partials;
  params.col_partials = sums.col_partials;
  switch (quantized.format) {
    case WeightFormat::kInt8:
      launch_staging<Int8WeightTile>(params, double_buffer, sums.grid, stream);
      break;
    case WeightFormat::kFourBit:
      launch_staging<FourBitWeightTile>(params, double_buffer, sums.grid, stream);
      break;
    default:
      dispatch_dtype(weight_dtype, kOp, [&](auto element) {
        launch_staging<DenseWeightTile<decltype(element)>>(params, double_buffer, sums.grid, stream);
      });
  }
  sum_partials(sums, row_sums, col_sums, stream, kOp);
}

}  // namespace loraprune
