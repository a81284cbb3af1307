// How the importance kernels read the frozen weight W: dense (fp32/fp16/bf16) or quantized as
// bitsandbytes holds it (loraprune/ops/quantized_weight.py), dequantized as it is loaded so that
// the packed W is read once and no dense copy exists.
//
//   int8   W[i][j] = q[i][j] · scales[i] / 127            (LLM.int8(): row absmax, bitsandbytes' SCB)
//   4-bit  W[e]    = code[nibble(e)] · scales[e >> shift]  (e = i·in + j; byte e/2, high nibble for even e;
//                                                           NF4/FP4 block absmax over 2^shift elements)
//
// lora_importance stages the raw (packed) 64×128 tile in shared memory with cp.async and
// dequantizes each accumulator pair on its way from shared memory into registers (the Tile*
// loaders below, one template argument of the kernel); taylor_importance reads W once in its
// epilogue through dequantized_weight().
#pragma once

#include <cstdint>

#include "cuda_utils.cuh"

namespace loraprune {
namespace {

// bitsandbytes' int8_vectorwise_dequant multiplies by this reciprocal of 127.
constexpr float kInt8InverseScale = 7.874015718698502e-3f;

// W as the kernels see it; the quantized fields are unused for a dense W.
struct WeightSource {
  const void* data;         // dense elements, int8 codes, or packed 4-bit codes
  std::int64_t row_stride;  // elements (dense, int8); 4-bit codes are packed row-major
  DType dtype;              // dense element type
  WeightFormat format;
  const float* scales;      // int8: one per row; 4-bit: one per block
  const float* code;        // 4-bit: the value of each of the 16 nibbles
  int block_shift;          // 4-bit: log2 of the block size
  int out_features;
  int in_features;
};

__device__ __forceinline__ float four_bit_value(const WeightSource& w, const unsigned char* bytes,
                                                std::int64_t element, const float* code) {
  const unsigned byte = bytes[element >> 1];
  const unsigned nibble = (element & 1) ? (byte & 15u) : (byte >> 4);
  return code[nibble] * w.scales[element >> w.block_shift];
}

// W[row][col] as float; the caller keeps (row, col) inside W. The format is uniform across the CTA.
__device__ __forceinline__ float dequantized_weight(const WeightSource& w, int row, int col) {
  switch (w.format) {
    case WeightFormat::kInt8: {
      const auto q = static_cast<const std::int8_t*>(w.data)[static_cast<std::int64_t>(row) * w.row_stride + col];
      return static_cast<float>(q) * w.scales[row] * kInt8InverseScale;
    }
    case WeightFormat::kFourBit:
      return four_bit_value(w, static_cast<const unsigned char*>(w.data),
                            static_cast<std::int64_t>(row) * w.in_features + col, w.code);
    default:
      break;
  }
  const std::int64_t index = static_cast<std::int64_t>(row) * w.row_stride + col;
  switch (w.dtype) {
    case DType::kFloat16:
      return __half2float(static_cast<const __half*>(w.data)[index]);
    case DType::kBFloat16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(w.data)[index]);
    default:
      return static_cast<const float*>(w.data)[index];
  }
}

__device__ __forceinline__ void cp_async_16(void* shared_dst, const void* global_src) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(shared_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(global_src) : "memory");
}

// 16 bytes to shared memory of which the first src_bytes (0..16) come from global memory, the rest zeros.
__device__ __forceinline__ void cp_async_16_zfill(void* shared_dst, const void* global_src, int src_bytes) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(shared_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(global_src), "r"(src_bytes)
               : "memory");
}

// 4 bytes to shared memory from global memory, or zeros when src_bytes is 0.
__device__ __forceinline__ void cp_async_4_zfill(void* shared_dst, const void* global_src, int src_bytes) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(shared_dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(global_src), "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Wait until at most `pending` (0..2) of the most recent cp.async groups are in flight.
__device__ __forceinline__ void cp_async_wait(int pending) {
  if (pending >= 2) {
    asm volatile("cp.async.wait_group 2;\n" ::: "memory");
  } else if (pending == 1) {
    asm volatile("cp.async.wait_group 1;\n" ::: "memory");
  } else {
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
  }
}

// --- staged tiles of lora_importance: kRows × kCols elements of W per CTA ------------------------
//
// Each loader has kBytes of shared memory (a multiple of 16), stage() (cp.async when `vector`, else
// plain copies; every thread calls it, and it commits one cp.async group either way) and pair(),
// the two elements (r, c), (r, c+1) of the tile (c even) as floats, read after the group
// completed and a barrier. Elements outside W may be anything: the kernel masks them.

// Copies rows row0.. and columns col0.. of a row-major W (elements of type Elem: the dense values
// or the int8 codes) into a tile of kRows rows of pitch kPitch; every thread calls it and it commits
// one cp.async group. `vector`: 16-byte cp.async chunks (in_features and the row stride are multiples
// of a chunk, so a chunk that starts inside a row ends inside it); else element by element.
template <typename Elem, int kRows, int kCols, int kPitch, int kThreads>
__device__ __forceinline__ void stage_row_major(const WeightSource& w, bool vector, Elem* dst, int row0, int col0) {
  const Elem* src = static_cast<const Elem*>(w.data);
  if (vector) {
    constexpr int kVec = 16 / static_cast<int>(sizeof(Elem));
    constexpr int kChunksPerRow = kCols / kVec;
    static_assert(kRows * kChunksPerRow % kThreads == 0, "whole passes");
#pragma unroll
    for (int pass = 0; pass < kRows * kChunksPerRow / kThreads; ++pass) {
      const int chunk = pass * kThreads + threadIdx.x;
      const int r = chunk / kChunksPerRow;
      const int c = (chunk % kChunksPerRow) * kVec;
      if (row0 + r < w.out_features && col0 + c < w.in_features) {
        cp_async_16(dst + r * kPitch + c, src + static_cast<std::int64_t>(row0 + r) * w.row_stride + (col0 + c));
      }
    }
  } else {
#pragma unroll 4
    for (int pass = 0; pass < kRows * kCols / kThreads; ++pass) {
      const int e = pass * kThreads + threadIdx.x;
      const int r = e / kCols;
      const int c = e % kCols;
      if (row0 + r < w.out_features && col0 + c < w.in_features) {
        dst[r * kPitch + c] = src[static_cast<std::int64_t>(row0 + r) * w.row_stride + (col0 + c)];
      }
    }
  }
  cp_async_commit();
}

template <typename T, int kRows, int kCols, int kThreads>
struct DenseTile {
  static constexpr int kPitch = kCols + 8;  // elements: 16-byte rows, conflict-free pair reads
  static constexpr int kBytes = kRows * kPitch * static_cast<int>(sizeof(T));

  __device__ static void stage(const WeightSource& w, bool vector, unsigned char* tile, int row0, int col0) {
    stage_row_major<T, kRows, kCols, kPitch, kThreads>(w, vector, reinterpret_cast<T*>(tile), row0, col0);
  }

  __device__ static float2 pair(const WeightSource&, const unsigned char* tile, int r, int c, int, int) {
    return load_pair(reinterpret_cast<const T*>(tile) + r * kPitch + c);
  }

  // Two adjacent elements as floats; the address is 4- or 8-byte aligned.
  __device__ static float2 load_pair(const float* p) { return *reinterpret_cast<const float2*>(p); }
  __device__ static float2 load_pair(const __half* p) { return __half22float2(*reinterpret_cast<const __half2*>(p)); }
  __device__ static float2 load_pair(const __nv_bfloat16* p) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
  }
};

template <int kRows, int kCols, int kThreads>
struct Int8Tile {
  // 144-byte rows: pair reads of lane (g, q) hit word 36·g + q/2, banks 4·g + {0, 1}: conflict-free.
  static constexpr int kPitch = kCols + 16;
  static constexpr int kBytes = kRows * kPitch;

  __device__ static void stage(const WeightSource& w, bool vector, unsigned char* tile, int row0, int col0) {
    stage_row_major<std::int8_t, kRows, kCols, kPitch, kThreads>(w, vector, reinterpret_cast<std::int8_t*>(tile),
                                                                  row0, col0);
  }

  __device__ static float2 pair(const WeightSource& w, const unsigned char* tile, int r, int c, int row0, int) {
    if (row0 + r >= w.out_features) {
      return make_float2(0.f, 0.f);
    }
    const float scale = w.scales[row0 + r];
    const auto* codes = reinterpret_cast<const std::int8_t*>(tile + r * kPitch + c);
    return make_float2(static_cast<float>(codes[0]) * scale * kInt8InverseScale,
                       static_cast<float>(codes[1]) * scale * kInt8InverseScale);
  }
};

template <int kRows, int kCols, int kThreads>
struct FourBitTile {
  // A tile row's codes start at element e0 = row·in + col0, in byte e0/2 at nibble e0 & 1, and
  // take at most kCols/2 + 1 bytes. 80-byte rows: pair reads of lane (g, q) hit word 20·g + const,
  // 8 distinct banks. The 16-entry code follows the rows.
  static constexpr int kPitch = kCols / 2 + 16;
  static constexpr int kCodeOffset = kRows * kPitch;
  static constexpr int kBytes = kCodeOffset + 16 * static_cast<int>(sizeof(float));
  static_assert(kCodeOffset % 16 == 0 && kBytes % 16 == 0, "16-byte aligned parts");

  __device__ static std::int64_t first_element(const WeightSource& w, int row, int col0) {
    return static_cast<std::int64_t>(row) * w.in_features + col0;
  }

  __device__ static void stage(const WeightSource& w, bool vector, unsigned char* tile, int row0, int col0) {
    const auto* packed = static_cast<const unsigned char*>(w.data);
    if (threadIdx.x < 16) {
      reinterpret_cast<float*>(tile + kCodeOffset)[threadIdx.x] = w.code[threadIdx.x];
    }
    if (vector) {  // 32 codes per copy; in_features is a multiple of 32, so rows start on a chunk
      constexpr int kChunksPerRow = kCols / 32;
      for (int chunk = threadIdx.x; chunk < kRows * kChunksPerRow; chunk += kThreads) {
        const int r = chunk / kChunksPerRow;
        const int c = (chunk % kChunksPerRow) * 32;
        if (row0 + r < w.out_features && col0 + c < w.in_features) {
          cp_async_16(tile + r * kPitch + c / 2, packed + (first_element(w, row0 + r, col0) + c) / 2);
        }
      }
    } else {
      constexpr int kRowBytes = kCols / 2 + 1;
      for (int e = threadIdx.x; e < kRows * kRowBytes; e += kThreads) {
        const int r = e / kRowBytes;
        const int j = e % kRowBytes;
        if (row0 + r < w.out_features) {
          const std::int64_t first = first_element(w, row0 + r, col0);
          const std::int64_t end = first - col0 + w.in_features;  // one past the row's last element
          const std::int64_t byte = (first >> 1) + j;
          if (2 * byte < end) {
            tile[r * kPitch + j] = packed[byte];
          }
        }
      }
    }
    cp_async_commit();
  }

  __device__ static float2 pair(const WeightSource& w, const unsigned char* tile, int r, int c, int row0, int col0) {
    const int row = row0 + r;
    if (row >= w.out_features || col0 + c >= w.in_features) {
      return make_float2(0.f, 0.f);
    }
    const float* code = reinterpret_cast<const float*>(tile + kCodeOffset);
    const std::int64_t first = first_element(w, row, col0);
    const int nibble = static_cast<int>(first & 1) + c;  // position in the staged row
    const unsigned char* bytes = tile + r * kPitch;
    const auto value = [&](int n, std::int64_t element) {
      const unsigned byte = bytes[n >> 1];
      return code[(n & 1) ? (byte & 15u) : (byte >> 4)] * w.scales[element >> w.block_shift];
    };
    const float second = col0 + c + 1 < w.in_features ? value(nibble + 1, first + c + 1) : 0.f;
    return make_float2(value(nibble, first + c), second);
  }
};

}  // namespace
}  // namespace loraprune

namespace loraprune {
namespace {

// Host: W as the kernels read it, its arguments checked (std::invalid_argument starting with `where`).
inline WeightSource weight_source(const std::string& where, std::uintptr_t weight, DType dtype,
                                  std::int64_t out_features, std::int64_t in_features, std::int64_t row_stride,
                                  const QuantizedWeightArgs& quantized) {
  const int format = static_cast<int>(quantized.format);
  require(format >= 0 && format <= static_cast<int>(WeightFormat::kFourBit),
          where + "unknown weight format " + std::to_string(format));
  require(row_stride >= 0, where + "weight_row_stride must be >= 0");
  WeightSource w{};
  w.data = reinterpret_cast<const void*>(weight);
  w.row_stride = row_stride;
  w.dtype = dtype;
  w.format = quantized.format;
  w.out_features = static_cast<int>(out_features);
  w.in_features = static_cast<int>(in_features);
  w.scales = reinterpret_cast<const float*>(quantized.scales);
  w.code = reinterpret_cast<const float*>(quantized.code);
  const bool empty = out_features == 0 || in_features == 0;
  switch (quantized.format) {
    case WeightFormat::kDense:
      require(is_dtype_code(dtype), where + "unknown weight dtype code " + std::to_string(static_cast<int>(dtype)));
      break;
    case WeightFormat::kInt8:
      require(empty || quantized.scales != 0, where + "int8 weight without row scales");
      break;
    case WeightFormat::kFourBit: {
      const std::int64_t blocksize = quantized.blocksize;
      require(blocksize >= 2 && blocksize <= (std::int64_t{1} << 30) && (blocksize & (blocksize - 1)) == 0,
              where + "blocksize must be a power of two >= 2, got " + std::to_string(blocksize));
      require(empty || (quantized.scales != 0 && quantized.code != 0), where + "4-bit weight without scales or code");
      while ((std::int64_t{1} << w.block_shift) < blocksize) {
        ++w.block_shift;
      }
      break;
    }
  }
  return w;
}

// Whether the staged-tile loaders may copy W 16 bytes at a time (base, row stride and width aligned).
inline bool weight_vector_loads(const WeightSource& w, std::uintptr_t weight) {
  if (weight % 16 != 0) {
    return false;
  }
  if (w.format == WeightFormat::kFourBit) {
    return w.in_features % 32 == 0;  // 16 bytes hold 32 codes; every row then starts 16-byte aligned
  }
  const std::int64_t element = w.format == WeightFormat::kInt8 ? 1 : w.dtype == DType::kFloat32 ? 4 : 2;
  return (w.row_stride * element) % 16 == 0 && (static_cast<std::int64_t>(w.in_features) * element) % 16 == 0;
}

}  // namespace
}  // namespace loraprune
