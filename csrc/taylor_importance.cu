// Fused first-order Taylor importance without the weight gradient, reduced to row and column sums.
//
//   G = dYᵀ·X                      (out × in, the weight gradient; never stored)
//   I = |G ⊙ (W + s·B·A)|          (or its square)
//
// A GEMM over the M tokens with the importance as its epilogue. One CTA (256 threads, eight warps
// of 32×32) owns a 64×128 tile of G. Per chunk of 32 tokens, dY's 64 columns and X's 128 columns
// are staged in shared memory transposed (feature-major, tokens contiguous), so that each mma
// fragment register is one 32-bit shared load; the next chunk's global loads are issued before
// the current chunk's MMAs. Tensor cores: mma.sync m16n8k16 with fp32 accumulation for fp16/bf16
// activations (the products are exact, so G is exact up to fp32 summation order); for float32
// activations 3xTF32 m16n8k8 (a = a_big + a_small, three products), close to fp32.
//
// The epilogue adds s·B·A in fp32 FMAs from rank chunks of the factors staged in shared memory
// (any rank), loads W (any float dtype, or int8 / packed 4-bit codes as bitsandbytes holds them,
// dequantized as they are read: dequantized_weight() in weight_tiles.cuh; chosen at run time,
// uniform across the CTA), forms I in registers and reduces it
// to the tile's row and column sums: lanes by shuffles, warps through shared memory in a fixed
// order, then one partial per tile to a workspace that sum_partials_kernel adds in a fixed order.
// Bitwise reproducible, no atomics, no out×in temporary.

#include <type_traits>

#include "cuda_utils.cuh"
#include "partial_sums.cuh"
#include "weight_tiles.cuh"

namespace loraprune {
namespace {

constexpr const char* kOp = "taylor_importance";

constexpr int kThreads = 256;
constexpr int kTileRows = 64;    // out features per CTA
constexpr int kTileCols = 128;   // in features per CTA
constexpr int kTokens = 32;      // tokens staged per chunk
constexpr int kRankChunk = 16;   // LoRA ranks staged per pass of the epilogue
constexpr int kWarpTileRows = 32;
constexpr int kWarpTileCols = 32;
constexpr int kWarpsAcross = kTileCols / kWarpTileCols;  // 4
constexpr int kWarpsDown = kTileRows / kWarpTileRows;     // 2
constexpr int kMmaRows = kWarpTileRows / 16;
constexpr int kMmaCols = kWarpTileCols / 8;
static_assert(kWarpsAcross * kWarpsDown * 32 == kThreads, "one warp per 32×32 sub-tile");
constexpr int kGradLoads = kTokens * kTileRows / kThreads;  // dY elements per thread per chunk
constexpr int kInputLoads = kTokens * kTileCols / kThreads;  // X elements per thread per chunk
static_assert(kTokens * kTileRows % kThreads == 0 && kTokens * kTileCols % kThreads == 0, "whole passes");

// Pitch (elements) of a staged feature's tokens. Fragment loads read word (feature·pitch/… + q):
// 16-bit: 40 halves = 20 words, float: 36 words; both put the 8 features a warp reads (g) in
// distinct groups of 4 banks, so the 32 lanes hit 32 banks.
template <typename T>
constexpr int kStagedPitch = std::is_same_v<T, float> ? kTokens + 4 : kTokens + 8;
constexpr int kFactorRowPitch = kRankChunk + 1;  // B chunk: [row][rank]
constexpr int kFactorColPitch = kTileCols + 4;   // A chunk: [rank][col]

struct TaylorParams {
  const void* x;            // tokens × in, unit column stride
  const void* grad_y;       // tokens × out, unit column stride
  std::int64_t x_row_stride;
  std::int64_t grad_row_stride;
  WeightSource weight;      // out × in, unit column stride
  const float* lora_a;      // rank × in, contiguous (unused when rank == 0)
  const float* lora_b;      // out × rank, contiguous
  int tokens;
  int out_features;
  int in_features;
  int rank;
  float scaling;
  bool squared;
  float* row_partials;      // [column tiles][out]
  float* col_partials;      // [row tiles][in]
};

__device__ __forceinline__ std::uint32_t to_tf32(float x) {
  std::uint32_t y;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(y) : "f"(x));
  return y;
}

// D += A·B, 16×8×8 TF32. Lane = 4·g + q: a (g,q) (g+8,q) (g,q+4) (g+8,q+4); b (k=q,n=g) (k=q+4,n=g).
__device__ __forceinline__ void mma_tf32(float (&d)[4], const std::uint32_t (&a)[4], const std::uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// D += A·B, 16×8×16 with 16-bit inputs, each register two elements adjacent in k (low half first):
// a {(g, 2q..2q+1), (g+8, 2q..), (g, 2q+8..), (g+8, 2q+8..)}; b {(k=2q..2q+1, n=g), (k=2q+8.., n=g)}.
// D as for mma_tf32: (g, 2q) (g, 2q+1) (g+8, 2q) (g+8, 2q+1).
template <typename T>
__device__ __forceinline__ void mma_16bit(float (&d)[4], const std::uint32_t (&a)[4], const std::uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// One chunk of tokens in registers, loaded from global memory (zeros outside the matrices).
template <typename T>
struct ChunkRegisters {
  T grad[kGradLoads];
  T input[kInputLoads];
};

template <typename T>
__device__ __forceinline__ void load_chunk(const TaylorParams& p, ChunkRegisters<T>& regs, int m0, int row0,
                                           int col0) {
  const T* grad_y = static_cast<const T*>(p.grad_y);
  const T* x = static_cast<const T*>(p.x);
  // Consecutive threads read consecutive features of a token: coalesced.
#pragma unroll
  for (int i = 0; i < kGradLoads; ++i) {
    const int e = i * kThreads + threadIdx.x;
    const int t = m0 + e / kTileRows;
    const int r = row0 + e % kTileRows;
    regs.grad[i] = (t < p.tokens && r < p.out_features)
                       ? grad_y[static_cast<std::int64_t>(t) * p.grad_row_stride + r]
                       : from_float<T>(0.f);
  }
#pragma unroll
  for (int i = 0; i < kInputLoads; ++i) {
    const int e = i * kThreads + threadIdx.x;
    const int t = m0 + e / kTileCols;
    const int c = col0 + e % kTileCols;
    regs.input[i] = (t < p.tokens && c < p.in_features) ? x[static_cast<std::int64_t>(t) * p.x_row_stride + c]
                                                         : from_float<T>(0.f);
  }
}

// Registers -> shared memory, transposed: staged_grad[row][token], staged_input[col][token].
template <typename T>
__device__ __forceinline__ void store_chunk(const ChunkRegisters<T>& regs, T* staged_grad, T* staged_input) {
  constexpr int kPitch = kStagedPitch<T>;
#pragma unroll
  for (int i = 0; i < kGradLoads; ++i) {
    const int e = i * kThreads + threadIdx.x;
    staged_grad[(e % kTileRows) * kPitch + e / kTileRows] = regs.grad[i];
  }
#pragma unroll
  for (int i = 0; i < kInputLoads; ++i) {
    const int e = i * kThreads + threadIdx.x;
    staged_input[(e % kTileCols) * kPitch + e / kTileCols] = regs.input[i];
  }
}

__device__ __forceinline__ std::uint32_t shared_word(const void* base, int element, int element_bytes) {
  return *reinterpret_cast<const std::uint32_t*>(static_cast<const unsigned char*>(base) + element * element_bytes);
}

// acc += (staged dYᵀ)·(staged X) over one chunk, for this warp's 32×32 sub-tile.
template <typename T>
__device__ __forceinline__ void multiply_chunk(const T* staged_grad, const T* staged_input, int warp_row0,
                                               int warp_col0, int group, int quad,
                                               float (&acc)[kMmaRows][kMmaCols][4]) {
  constexpr int kPitch = kStagedPitch<T>;
  if constexpr (std::is_same_v<T, float>) {
#pragma unroll
    for (int kb = 0; kb < kTokens; kb += 8) {
      std::uint32_t a_big[kMmaRows][4];
      std::uint32_t a_small[kMmaRows][4];
#pragma unroll
      for (int mi = 0; mi < kMmaRows; ++mi) {
        const int at = (warp_row0 + mi * 16 + group) * kPitch + kb + quad;
        const float v[4] = {staged_grad[at], staged_grad[at + 8 * kPitch], staged_grad[at + 4],
                            staged_grad[at + 8 * kPitch + 4]};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          a_big[mi][j] = to_tf32(v[j]);
          a_small[mi][j] = to_tf32(v[j] - __uint_as_float(a_big[mi][j]));
        }
      }
#pragma unroll
      for (int ni = 0; ni < kMmaCols; ++ni) {
        const int at = (warp_col0 + ni * 8 + group) * kPitch + kb + quad;
        const float v[2] = {staged_input[at], staged_input[at + 4]};
        std::uint32_t b_big[2];
        std::uint32_t b_small[2];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          b_big[j] = to_tf32(v[j]);
          b_small[j] = to_tf32(v[j] - __uint_as_float(b_big[j]));
        }
#pragma unroll
        for (int mi = 0; mi < kMmaRows; ++mi) {  // small products first: they are the smallest
          mma_tf32(acc[mi][ni], a_big[mi], b_small);
          mma_tf32(acc[mi][ni], a_small[mi], b_big);
          mma_tf32(acc[mi][ni], a_big[mi], b_big);
        }
      }
    }
  } else {
    constexpr int kBytes = static_cast<int>(sizeof(T));
#pragma unroll
    for (int kb = 0; kb < kTokens; kb += 16) {
      std::uint32_t a[kMmaRows][4];
#pragma unroll
      for (int mi = 0; mi < kMmaRows; ++mi) {
        const int at = (warp_row0 + mi * 16 + group) * kPitch + kb + 2 * quad;
        a[mi][0] = shared_word(staged_grad, at, kBytes);
        a[mi][1] = shared_word(staged_grad, at + 8 * kPitch, kBytes);
        a[mi][2] = shared_word(staged_grad, at + 8, kBytes);
        a[mi][3] = shared_word(staged_grad, at + 8 * kPitch + 8, kBytes);
      }
#pragma unroll
      for (int ni = 0; ni < kMmaCols; ++ni) {
        const int at = (warp_col0 + ni * 8 + group) * kPitch + kb + 2 * quad;
        const std::uint32_t b[2] = {shared_word(staged_input, at, kBytes), shared_word(staged_input, at + 8, kBytes)};
#pragma unroll
        for (int mi = 0; mi < kMmaRows; ++mi) {
          mma_16bit<T>(acc[mi][ni], a[mi], b);
        }
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) taylor_importance_kernel(const TaylorParams p) {
  constexpr int kPitch = kStagedPitch<T>;
  __shared__ __align__(16) T staged_grad[kTileRows * kPitch];
  __shared__ __align__(16) T staged_input[kTileCols * kPitch];
  __shared__ float factor_b[kTileRows * kFactorRowPitch];
  __shared__ float factor_a[kRankChunk * kFactorColPitch];
  __shared__ float row_part[kWarpsAcross * kTileRows];
  __shared__ float col_part[kWarpsDown * kTileCols];

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int group = lane >> 2;
  const int quad = lane & 3;
  const int warp_row0 = (warp / kWarpsAcross) * kWarpTileRows;
  const int warp_col0 = (warp % kWarpsAcross) * kWarpTileCols;
  const int row0 = blockIdx.y * kTileRows;
  const int col0 = blockIdx.x * kTileCols;

  // G for the tile, over all tokens; a chunk's global loads overlap the previous chunk's MMAs.
  float acc[kMmaRows][kMmaCols][4] = {};
  ChunkRegisters<T> regs;
  load_chunk(p, regs, 0, row0, col0);
  for (int m0 = 0; m0 < p.tokens; m0 += kTokens) {
    __syncthreads();  // every warp is done with the previous chunk
    store_chunk(regs, staged_grad, staged_input);
    __syncthreads();
    if (m0 + kTokens < p.tokens) {
      load_chunk(p, regs, m0 + kTokens, row0, col0);
    }
    multiply_chunk(staged_grad, staged_input, warp_row0, warp_col0, group, quad, acc);
  }

  // B·A for the tile in fp32, a rank chunk at a time (zero ranks outside the factors add nothing).
  float lora[kMmaRows][kMmaCols][4] = {};
  for (int k0 = 0; k0 < p.rank; k0 += kRankChunk) {
    __syncthreads();
    for (int e = tid; e < kTileRows * kRankChunk; e += kThreads) {
      const int r = e / kRankChunk;
      const int k = e % kRankChunk;
      factor_b[r * kFactorRowPitch + k] =
          (row0 + r < p.out_features && k0 + k < p.rank)
              ? p.lora_b[static_cast<std::int64_t>(row0 + r) * p.rank + (k0 + k)]
              : 0.f;
    }
    for (int e = tid; e < kRankChunk * kTileCols; e += kThreads) {
      const int k = e / kTileCols;
      const int c = e % kTileCols;
      factor_a[k * kFactorColPitch + c] =
          (k0 + k < p.rank && col0 + c < p.in_features)
              ? p.lora_a[static_cast<std::int64_t>(k0 + k) * p.in_features + (col0 + c)]
              : 0.f;
    }
    __syncthreads();
    const int ranks = min(kRankChunk, p.rank - k0);
    for (int k = 0; k < ranks; ++k) {
      float b[kMmaRows][2];
      float a[kMmaCols][2];
#pragma unroll
      for (int mi = 0; mi < kMmaRows; ++mi) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          b[mi][half] = factor_b[(warp_row0 + mi * 16 + half * 8 + group) * kFactorRowPitch + k];
        }
      }
#pragma unroll
      for (int ni = 0; ni < kMmaCols; ++ni) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          a[ni][e] = factor_a[k * kFactorColPitch + warp_col0 + ni * 8 + 2 * quad + e];
        }
      }
#pragma unroll
      for (int mi = 0; mi < kMmaRows; ++mi) {
#pragma unroll
        for (int ni = 0; ni < kMmaCols; ++ni) {
#pragma unroll
          for (int half = 0; half < 2; ++half) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              lora[mi][ni][2 * half + e] = fmaf(b[mi][half], a[ni][e], lora[mi][ni][2 * half + e]);
            }
          }
        }
      }
    }
  }

  // Importance of this thread's elements, summed per row and per column.
  float row_sum[kMmaRows][2] = {};
  float col_sum[kMmaCols][2] = {};
#pragma unroll
  for (int mi = 0; mi < kMmaRows; ++mi) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = row0 + warp_row0 + mi * 16 + half * 8 + group;
#pragma unroll
      for (int ni = 0; ni < kMmaCols; ++ni) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int c = col0 + warp_col0 + ni * 8 + 2 * quad + e;
          float v = 0.f;  // outside W: G is zero there, and W is not read
          if (r < p.out_features && c < p.in_features) {
            const float w = dequantized_weight(p.weight, r, c);
            v = acc[mi][ni][2 * half + e] * (w + p.scaling * lora[mi][ni][2 * half + e]);
            v = p.squared ? v * v : fabsf(v);
          }
          row_sum[mi][half] += v;
          col_sum[ni][e] += v;
        }
      }
    }
  }

  // Rows: reduce over the 4 lanes (q) sharing a row; columns: over the 8 lanes (g) sharing one.
  const int warp_across = warp % kWarpsAcross;
  const int warp_down = warp / kWarpsAcross;
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

}  // namespace

std::int64_t taylor_importance_workspace_floats(std::int64_t out_features, std::int64_t in_features) {
  require(out_features >= 0 && in_features >= 0, "loraprune._C.taylor_importance_workspace_floats: negative size");
  return partial_sums_floats(out_features, in_features, kTileRows, kTileCols);
}

void taylor_importance(const LaunchContext& ctx, std::uintptr_t x, std::uintptr_t grad_y, DType dtype,
                       std::int64_t tokens, std::int64_t out_features, std::int64_t in_features,
                       std::int64_t x_row_stride, std::int64_t grad_row_stride, std::uintptr_t weight,
                       DType weight_dtype, std::int64_t weight_row_stride, std::uintptr_t lora_a,
                       std::uintptr_t lora_b, std::int64_t rank, double scaling, bool squared,
                       std::uintptr_t row_sums, std::uintptr_t col_sums, std::uintptr_t workspace,
                       std::int64_t workspace_floats, const QuantizedWeightArgs& quantized) {
  const std::string where = std::string("loraprune._C.") + kOp + ": ";
  check_importance_outputs(where, out_features, in_features, row_sums, col_sums, workspace, workspace_floats,
                           kTileRows, kTileCols, "taylor_importance_workspace_floats");
  require(tokens >= 0 && tokens <= kInt32Max - kTokens, where + "tokens must lie in [0, 2^31 - 32)");
  require(rank >= 0 && rank <= kInt32Max, where + "rank must be >= 0 (0: no LoRA)");
  require(is_dtype_code(dtype), where + "unknown dtype code " + std::to_string(static_cast<int>(dtype)));
  require(x_row_stride >= 0 && grad_row_stride >= 0, where + "row strides must be >= 0");
  TaylorParams params{};
  params.weight = weight_source(where, weight, weight_dtype, out_features, in_features, weight_row_stride, quantized);
  const bool empty = out_features == 0 || in_features == 0 || tokens == 0;
  require(empty || (x != 0 && grad_y != 0 && weight != 0 && (rank == 0 || (lora_a != 0 && lora_b != 0))),
          where + "null input pointer");
  const cudaStream_t stream = as_stream(ctx.stream);
  DeviceGuard guard(ctx.device, kOp);
  // No tokens: the gradient, hence every sum, is zero.
  if (zero_sums_if_empty(empty, out_features, in_features, row_sums, col_sums, stream, kOp)) {
    return;
  }

  const PartialSums sums = partial_sums(workspace, out_features, in_features, kTileRows, kTileCols, kOp);
  params.x = reinterpret_cast<const void*>(x);
  params.grad_y = reinterpret_cast<const void*>(grad_y);
  params.x_row_stride = x_row_stride;
  params.grad_row_stride = grad_row_stride;
  params.lora_a = reinterpret_cast<const float*>(lora_a);
  params.lora_b = reinterpret_cast<const float*>(lora_b);
  params.tokens = static_cast<int>(tokens);
  params.out_features = static_cast<int>(out_features);
  params.in_features = static_cast<int>(in_features);
  params.rank = static_cast<int>(rank);
  params.scaling = static_cast<float>(scaling);
  params.squared = squared;
  params.row_partials = sums.row_partials;
  params.col_partials = sums.col_partials;
  dispatch_dtype(dtype, kOp, [&](auto element) {
    using T = decltype(element);
    taylor_importance_kernel<T><<<sums.grid, kThreads, 0, stream>>>(params);
    check_launch("taylor_importance_kernel", kOp);
  });
  sum_partials(sums, row_sums, col_sums, stream, kOp);
}

}  // namespace loraprune
