// Test-only stand-in for <c10/cuda/CUDAException.h>: an emulated launch error raises as CUDA's would.
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#define C10_CUDA_CHECK(expr)                                                               \
  do {                                                                                     \
    const cudaError_t msplora_emulated_error = (expr);                                     \
    TORCH_CHECK(msplora_emulated_error == cudaSuccess, "emulated CUDA error ",             \
                static_cast<int>(msplora_emulated_error));                                 \
  } while (0)
