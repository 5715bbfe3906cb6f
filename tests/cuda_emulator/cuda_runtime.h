// Test-only stand-in for <cuda_runtime.h>: with it first on the include path, g++ compiles
// csrc/cuda/*.cu (after tests/cuda_emulation.py rewrites `k<<<grid, block, 0, s>>>(...)` into
// `::emu::launch(k, grid, block, 0, s, ...)`) and runs every kernel on the CPU (emulator.h).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// One block runs at a time, so a function-local static array is that block's shared memory.
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidConfiguration = 9, cudaErrorLaunchFailure = 719 };

// Device code calls the unqualified overloads CUDA provides.
using std::max;
using std::min;

#include "emulator.h"
