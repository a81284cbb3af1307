// One structure-score update in one single-block kernel (the vectors are per-layer importance
// sums: thousands to tens of thousands of elements):
//
//   now = Σ_p fold(p / max(‖p‖₂, FLT_MIN))      fold: sum each unit's contiguous chunk
//   S   = now                         if num_updates == 0
//   S   = decay·S + (1 − decay)·now   otherwise
//
// and a step whose `now` holds NaN/Inf leaves S untouched and bumps num_skipped instead of
// num_updates. Everything, counters included, stays on the device: no host synchronisation.

#include <cfloat>

#include "cuda_utils.cuh"

namespace loraprune {
namespace {

constexpr const char* kOp = "score_update";
constexpr int kThreads = 1024;
constexpr int kMaxParts = 8;

struct ScorePart {
  const void* data;
  std::int64_t length;
  std::int64_t stride;  // elements
  int dtype;            // DType code
};

struct ScoreParts {
  ScorePart part[kMaxParts];
  int count;
};

__device__ __forceinline__ float load_element(const ScorePart& part, std::int64_t i) {
  const std::int64_t at = i * part.stride;
  switch (static_cast<DType>(part.dtype)) {
    case DType::kFloat16:
      return __half2float(static_cast<const __half*>(part.data)[at]);
    case DType::kBFloat16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(part.data)[at]);
    default:
      return static_cast<const float*>(part.data)[at];
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

// Sum over the block, valid in thread 0. `scratch` holds one float per warp.
__device__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // a previous call may still be reading scratch
  if (lane == 0) {
    scratch[warp] = v;
  }
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? scratch[threadIdx.x] : 0.f;
  return warp == 0 ? warp_sum(v) : 0.f;
}

// now[unit]: each part's chunk of normalised values summed, then the parts summed in order
// (the reference's order).
__device__ float unit_score(const ScoreParts& parts, const float* norms, std::int64_t num_units, std::int64_t unit) {
  float now = 0.f;
#pragma unroll
  for (int p = 0; p < kMaxParts; ++p) {
    if (p < parts.count) {
      const ScorePart& part = parts.part[p];
      const std::int64_t chunk = part.length / num_units;
      float sum = 0.f;
      for (std::int64_t e = unit * chunk; e < (unit + 1) * chunk; ++e) {
        sum += load_element(part, e) / norms[p];
      }
      now += sum;
    }
  }
  return now;
}

__global__ void __launch_bounds__(kThreads) score_update_kernel(float* __restrict__ scores, std::int64_t num_units,
                                                                const ScoreParts parts, float decay, float keep,
                                                                std::int64_t* __restrict__ num_updates,
                                                                std::int64_t* __restrict__ num_skipped) {
  __shared__ float scratch[kThreads / 32];
  __shared__ float norms[kMaxParts];
  __shared__ bool first_update;
  const int tid = threadIdx.x;
  if (tid == 0) {
    first_update = *num_updates == 0;  // read before thread 0 bumps it at the end
  }

#pragma unroll
  for (int p = 0; p < kMaxParts; ++p) {
    if (p < parts.count) {
      const ScorePart& part = parts.part[p];
      float squares = 0.f;
      for (std::int64_t i = tid; i < part.length; i += kThreads) {
        const float x = load_element(part, i);
        squares += x * x;
      }
      squares = block_sum(squares, scratch);
      if (tid == 0) {
        const float norm = sqrtf(squares);
        norms[p] = norm < FLT_MIN ? FLT_MIN : norm;  // clamp_min that lets NaN through, like torch
      }
    }
  }
  __syncthreads();  // norms and first_update are visible

  bool finite = true;
  for (std::int64_t unit = tid; unit < num_units; unit += kThreads) {
    finite &= isfinite(unit_score(parts, norms, num_units, unit));
  }
  if (__syncthreads_or(!finite)) {
    if (tid == 0) {
      *num_skipped += 1;
    }
    return;
  }

  // Recomputing `now` (same order, same bits) is cheaper than staging it: it is a few reads.
  for (std::int64_t unit = tid; unit < num_units; unit += kThreads) {
    const float now = unit_score(parts, norms, num_units, unit);
    // Unfused multiply-adds: the same roundings as the reference's decay·S + (1−decay)·now.
    scores[unit] = first_update ? now : __fadd_rn(__fmul_rn(decay, scores[unit]), __fmul_rn(keep, now));
  }
  if (tid == 0) {
    *num_updates += 1;
  }
}

}  // namespace

void score_update(const LaunchContext& ctx, std::uintptr_t scores, std::int64_t num_units,
                  const std::vector<std::uintptr_t>& parts, const std::vector<std::int64_t>& part_lengths,
                  const std::vector<std::int64_t>& part_strides, const std::vector<int>& part_dtypes, double decay,
                  std::uintptr_t num_updates, std::uintptr_t num_skipped) {
  const std::string where = std::string("loraprune._C.") + kOp + ": ";
  require(num_units >= 1, where + "num_units must be >= 1");
  require(!parts.empty() && parts.size() <= kMaxParts, where + "parts must hold 1 to 8 vectors");
  require(part_lengths.size() == parts.size() && part_strides.size() == parts.size() &&
              part_dtypes.size() == parts.size(),
          where + "parts, part_lengths, part_strides and part_dtypes must have the same length");
  require(scores != 0 && num_updates != 0 && num_skipped != 0, where + "null pointer");
  require(decay >= 0.0 && decay < 1.0, where + "decay must lie in [0, 1)");
  ScoreParts packed{};
  packed.count = static_cast<int>(parts.size());
  for (std::size_t p = 0; p < parts.size(); ++p) {
    const std::string name = "parts[" + std::to_string(p) + "]";
    require(parts[p] != 0, where + name + " is a null pointer");
    require(part_lengths[p] > 0 && part_lengths[p] % num_units == 0,
            where + name + " length must be a positive multiple of num_units");
    require(part_strides[p] >= 0, where + name + " stride must be >= 0");
    require(is_dtype_code(static_cast<DType>(part_dtypes[p])),
            where + name + " has an unknown dtype code");
    packed.part[p] = ScorePart{reinterpret_cast<const void*>(parts[p]), part_lengths[p], part_strides[p],
                               part_dtypes[p]};
  }
  DeviceGuard guard(ctx.device, kOp);
  score_update_kernel<<<1, kThreads, 0, as_stream(ctx.stream)>>>(
      reinterpret_cast<float*>(scores), num_units, packed, static_cast<float>(decay), static_cast<float>(1.0 - decay),
      reinterpret_cast<std::int64_t*>(num_updates), reinterpret_cast<std::int64_t*>(num_skipped));
  check_launch("score_update_kernel", kOp);
}

}  // namespace loraprune
