// Shared helpers of the .cu files: error checking, the device guard, element conversions and
// checked launch-geometry arithmetic.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

#include "loraprune_C.h"

namespace loraprune {

[[noreturn]] inline void throw_cuda_error(cudaError_t status, const char* what, const char* op) {
  throw std::runtime_error(std::string("loraprune._C.") + op + ": " + what + " failed: " +
                           cudaGetErrorName(status) + " (" + cudaGetErrorString(status) + ")");
}

// Every runtime call goes through this; `op` names the Python-visible function in the message.
#define LORAPRUNE_CUDA_CHECK(call, op)                                   \
  do {                                                                   \
    const cudaError_t loraprune_status_ = (call);                        \
    if (loraprune_status_ != cudaSuccess) {                              \
      throw_cuda_error(loraprune_status_, #call, op);                    \
    }                                                                    \
  } while (0)

// After every launch: configuration errors are reported here; errors raised while the kernel
// runs surface at the next synchronising call (asynchronously, as for any CUDA library).
inline void check_launch(const char* kernel, const char* op) {
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) {
    throw_cuda_error(status, kernel, op);
  }
}

inline void require(bool condition, const std::string& message) {
  if (!condition) {
    throw std::invalid_argument(message);
  }
}

// This module links its own (static) CUDA runtime, whose per-thread current device is
// independent of PyTorch's: select the pointers' device for the call and restore it after, so
// that neither library sees the other's choice.
class DeviceGuard {
 public:
  DeviceGuard(int device, const char* op) {
    cudaError_t status = cudaGetDevice(&previous_);
    if (status != cudaSuccess) {
      throw_cuda_error(status, "cudaGetDevice", op);
    }
    if (previous_ != device) {
      status = cudaSetDevice(device);
      if (status != cudaSuccess) {
        throw_cuda_error(status, ("cudaSetDevice(" + std::to_string(device) + ")").c_str(), op);
      }
      switched_ = true;
    }
  }
  ~DeviceGuard() {
    if (switched_) {
      cudaSetDevice(previous_);  // best effort: a destructor must not throw
    }
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

inline cudaStream_t as_stream(std::uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

inline std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

// Grid y and z are limited to 65535 blocks.
inline unsigned grid_y(std::int64_t blocks, const char* op, const char* what) {
  require(blocks <= 65535, std::string("loraprune._C.") + op + ": " + what + " needs " +
                               std::to_string(blocks) + " row blocks, more than the 65535 a launch allows");
  return static_cast<unsigned>(blocks);
}

inline unsigned grid_x(std::int64_t blocks) { return static_cast<unsigned>(blocks); }  // 2^31-1 allowed

constexpr std::int64_t kInt32Max = std::numeric_limits<std::int32_t>::max();

// Element <-> float conversions (exact widening; round-to-nearest-even narrowing, as torch's .to()).
template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

inline bool is_dtype_code(DType dtype) {
  const int code = static_cast<int>(dtype);
  return code >= static_cast<int>(DType::kFloat32) && code <= static_cast<int>(DType::kBFloat16);
}

// Calls f(T{}) with T the element type of `dtype`.
template <typename F>
void dispatch_dtype(DType dtype, const char* op, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      f(float{});
      return;
    case DType::kFloat16:
      f(__half{});
      return;
    case DType::kBFloat16:
      f(__nv_bfloat16{});
      return;
  }
  throw std::invalid_argument(std::string("loraprune._C.") + op + ": unknown dtype code " +
                              std::to_string(static_cast<int>(dtype)));
}

}  // namespace loraprune
