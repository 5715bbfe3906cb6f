// The ops that set and read settings.h from Python: set_setting("cpu_gemm", "onednn") and so on.
#include <torch/library.h>

#include <iterator>
#include <string>

#include "settings.h"

namespace msplora {

Settings& settings() {
  static Settings instance;
  return instance;
}

namespace {

int parse(const std::string& name, const std::string& value) {
  if (name == "cpu_gemm") {
    for (int i = 0; i < static_cast<int>(std::size(kCpuGemmNames)); ++i) {
      if (value == kCpuGemmNames[i]) return i;
    }
  } else if (name == "cuda_skinny") {
    if (value == "auto") return static_cast<int>(CudaSkinny::kAuto);
    if (value == "kernels") return static_cast<int>(CudaSkinny::kKernels);
    if (value == "cublas") return static_cast<int>(CudaSkinny::kCublas);
  } else {
    TORCH_CHECK(false, "msplora: unknown setting '", name, "'; the compiled ones are cpu_gemm and cuda_skinny");
  }
  TORCH_CHECK(false, "msplora: setting ", name, " cannot be '", value,
              "' (cpu_gemm: auto, aten, onednn, aten:plain, aten:transposed, onednn:plain, onednn:transposed or fused; "
              "cuda_skinny: auto, kernels or cublas)");
}

void set_setting(std::string name, std::string value) {
  const int parsed = parse(name, value);
  (name == "cpu_gemm" ? settings().cpu_gemm : settings().cuda_skinny).store(parsed);
}

std::string get_setting(std::string name) {
  if (name == "cpu_gemm") return kCpuGemmNames[static_cast<int>(cpu_gemm())];
  TORCH_CHECK(name == "cuda_skinny", "msplora: unknown setting '", name, "'");
  switch (cuda_skinny()) {
    case CudaSkinny::kKernels: return "kernels";
    case CudaSkinny::kCublas: return "cublas";
    default: return "auto";
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(msplora, m) {
  m.def("set_setting(str name, str value) -> ()", &set_setting);
  m.def("get_setting(str name) -> str", &get_setting);
}

}  // namespace msplora
