// Process-wide choices that the kernels' launchers follow, mirrored from Python
// (msplora_kernels/ops/settings.py), which resolves them and sets them through the op
// msplora::set_setting when the package loads and on every change. Nothing here reads the
// environment. Plain C++, so that the CUDA launchers' emulated build (tests/) can use it too.
#pragma once

#include <atomic>

namespace msplora {

// Which GEMMs the cpp backend may run (cpu/gemms.h): every candidate, timed per shape class
// (kAuto), one library's, one fixed library and orientation, or our kernels where one applies
// (kFused: cpu/expand_bf16.h or cpu/fused_expand.h for the products added into a whole (M, N)
// tensor, cpu/thin_product.h for the bf16 thin products and dT with dB in one pass; ATen for the
// others).
enum class CpuGemm : int {
  kAuto = 0,
  kAten,
  kOneDnn,
  kAtenPlain,
  kAtenTransposed,
  kOneDnnPlain,
  kOneDnnTransposed,
  kFused
};
inline constexpr const char* kCpuGemmNames[] = {"auto", "aten", "onednn", "aten:plain", "aten:transposed",
                                                "onednn:plain", "onednn:transposed", "fused"};
// Who runs the cuda backend's rank-R products (cuda/msplora_cuda.cpp): ours up to a total
// rank of 64 and cuBLAS beyond (kAuto), or always one of them.
enum class CudaSkinny : int { kAuto = 0, kKernels = 1, kCublas = 2 };

struct Settings {
  std::atomic<int> cpu_gemm{static_cast<int>(CpuGemm::kAuto)};
  std::atomic<int> cuda_skinny{static_cast<int>(CudaSkinny::kAuto)};
};

Settings& settings();

inline CpuGemm cpu_gemm() { return static_cast<CpuGemm>(settings().cpu_gemm.load(std::memory_order_relaxed)); }
inline CudaSkinny cuda_skinny() {
  return static_cast<CudaSkinny>(settings().cuda_skinny.load(std::memory_order_relaxed));
}

}  // namespace msplora
