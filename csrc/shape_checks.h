// Argument checks shared by every device's launchers. The Python layer gives
// friendlier errors first; these make a direct torch.ops call safe too.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

namespace msplora {

inline void check_matrix(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, "msplora: ", name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "msplora: ", name,
              " must be floating point, got ", t.scalar_type());
}

inline void check_same(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "msplora: ", name, " has dtype ", t.scalar_type(),
              " but ", ref_name, " has dtype ", ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "msplora: ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device());
}

inline void check_dim(int64_t got, int64_t want, const char* what) {
  TORCH_CHECK(got == want, "msplora: ", what, " mismatch: ", got, " vs ", want);
}

inline void check_dropout(double p, const at::Tensor& seed) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "msplora: dropout p must be in [0, 1), got ", p);
  if (p > 0.0) {
    TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong,
                "msplora: seed must be an int64 tensor of one element, got ", seed.scalar_type(), " ",
                seed.sizes());
  }
}

}  // namespace msplora
