// Test-only stand-in for <ATen/cuda/CUDAContext.h>: what csrc/cuda/msplora_cuda.cpp asks of the
// device, answered for CPU tensors running the emulated kernels.
#pragma once

#include <cuda_runtime.h>

namespace at::cuda {

struct DeviceProperties {
  int multiProcessorCount = 132;  // an H100 SXM, so the launchers pick the splits they would there
};

inline DeviceProperties* getCurrentDeviceProperties() {
  static DeviceProperties properties;
  return &properties;
}

struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};

inline CUDAStream getCurrentCUDAStream() { return {}; }

}  // namespace at::cuda
