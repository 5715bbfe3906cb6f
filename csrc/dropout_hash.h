// Counter-based dropout mask shared by the CPU and CUDA kernels (and computed alike in Triton).
//
// The mask of element `index` of the logical (rows x cols) input is a pure
// function of (seed, index), so the backward pass regenerates it instead of
// storing it, and the CPU, CUDA and Triton backends draw identical masks (the Triton
// kernels compute the same hash, triton_kernels/kernels.py: _keep).
// Plain C++: this header must compile under nvcc without torch headers.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MSPLORA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MSPLORA_HOST_DEVICE inline
#endif

namespace msplora {

// splitmix64's finalizer over a Weyl sequence keyed by the seed.
MSPLORA_HOST_DEVICE uint64_t mix64(uint64_t seed, uint64_t index) {
  uint64_t z = index + seed * 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Uniform in [0, 1) with 24 bits, exactly representable in float.
MSPLORA_HOST_DEVICE float uniform01(uint64_t seed, uint64_t index) {
  return static_cast<float>(mix64(seed, index) >> 40) * (1.0f / 16777216.0f);
}

}  // namespace msplora
