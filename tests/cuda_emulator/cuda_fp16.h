// Test-only stand-in for <cuda_fp16.h>: IEEE half through GCC's _Float16 (round to nearest even).
#pragma once

struct __half {
  _Float16 value;
};
static_assert(sizeof(__half) == 2, "__half must be 2 bytes to alias torch.float16 storage");

inline float __half2float(__half h) { return static_cast<float>(h.value); }
inline __half __float2half_rn(float f) { return __half{static_cast<_Float16>(f)}; }
