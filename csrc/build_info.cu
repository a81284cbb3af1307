// Build facts reported by loraprune._C (no device code).

#include "cuda_utils.cuh"

#ifndef LORAPRUNE_CUDA_ARCHS
#error "setup.py defines LORAPRUNE_CUDA_ARCHS (the LORAPRUNE_CUDA_ARCHS list the kernels were built for)"
#endif

namespace loraprune {

int cuda_runtime_version() { return CUDART_VERSION; }

std::string cuda_architectures() { return LORAPRUNE_CUDA_ARCHS; }

}  // namespace loraprune
