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

inline void check_p(double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "msplora: dropout p must be in [0, 1), got ", p);
}

inline void check_dropout(double p, const at::Tensor& seed) {
  check_p(p);
  if (p > 0.0) {
    TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong,
                "msplora: seed must be an int64 tensor of one element, got ", seed.scalar_type(), " ",
                seed.sizes());
  }
}

// Per-op checks, one definition for every device's launcher.
inline void check_shrink_args(const at::Tensor& x, const at::Tensor& a, double p, const at::Tensor& seed) {
  check_matrix(x, "x");
  check_matrix(a, "a");
  check_same(a, x, "a", "x");
  check_dim(a.size(0), x.size(1), "a.size(0) vs x.size(1) (in_features)");
  check_dropout(p, seed);
}

inline void check_expand_linear_args(const at::Tensor& x, const at::Tensor& weight,
                                     const c10::optional<at::Tensor>& bias, const at::Tensor& t, const at::Tensor& b) {
  check_matrix(x, "x");
  check_matrix(weight, "weight");
  check_matrix(t, "t");
  check_matrix(b, "b");
  check_same(weight, x, "weight", "x");
  check_same(t, x, "t", "x");
  check_same(b, x, "b", "x");
  check_dim(weight.size(1), x.size(1), "weight.size(1) vs x.size(1) (in_features)");
  check_dim(t.size(0), x.size(0), "t.size(0) vs x.size(0) (rows)");
  check_dim(b.size(0), t.size(1), "b.size(0) vs t.size(1) (total rank)");
  check_dim(b.size(1), weight.size(0), "b.size(1) vs weight.size(0) (out_features)");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "msplora: bias must have shape (",
                weight.size(0), ",), got ", bias->sizes());
    check_same(*bias, x, "bias", "x");
  }
}

inline void check_grad_t_b_args(const at::Tensor& dy, const at::Tensor& t, const at::Tensor& b) {
  check_matrix(dy, "dy");
  check_matrix(t, "t");
  check_matrix(b, "b");
  check_same(t, dy, "t", "dy");
  check_same(b, dy, "b", "dy");
  check_dim(t.size(0), dy.size(0), "t.size(0) vs dy.size(0) (rows)");
  check_dim(b.size(0), t.size(1), "b.size(0) vs t.size(1) (total rank)");
  check_dim(b.size(1), dy.size(1), "b.size(1) vs dy.size(1) (out_features)");
}

inline void check_grad_x_shapes(const at::Tensor& dy, const at::Tensor& weight, const at::Tensor& dt,
                                const at::Tensor& a) {
  check_matrix(dy, "dy");
  check_matrix(weight, "weight");
  check_matrix(dt, "dt");
  check_matrix(a, "a");
  check_same(weight, dy, "weight", "dy");
  check_same(dt, dy, "dt", "dy");
  check_same(a, dy, "a", "dy");
  check_dim(weight.size(0), dy.size(1), "weight.size(0) vs dy.size(1) (out_features)");
  check_dim(dt.size(0), dy.size(0), "dt.size(0) vs dy.size(0) (rows)");
  check_dim(a.size(0), weight.size(1), "a.size(0) vs weight.size(1) (in_features)");
  check_dim(a.size(1), dt.size(1), "a.size(1) vs dt.size(1) (total rank)");
}

inline void check_grad_x_args(const at::Tensor& dy, const at::Tensor& weight, const at::Tensor& dt, const at::Tensor& a,
                              double p, const at::Tensor& seed) {
  check_grad_x_shapes(dy, weight, dt, a);
  check_dropout(p, seed);
}

inline void check_grad_a_shapes(const at::Tensor& x, const at::Tensor& dt) {
  check_matrix(x, "x");
  check_matrix(dt, "dt");
  check_same(dt, x, "dt", "x");
  check_dim(dt.size(0), x.size(0), "dt.size(0) vs x.size(0) (rows)");
}

inline void check_grad_a_args(const at::Tensor& x, const at::Tensor& dt, double p, const at::Tensor& seed) {
  check_grad_a_shapes(x, dt);
  check_dropout(p, seed);
}

// A packed dropout mask for an (rows, cols) input: int32 words, (rows, ceil(cols / 32)), on its device.
inline void check_bits(const at::Tensor& bits, const at::Tensor& like, int64_t rows, int64_t cols) {
  const int64_t words = (cols + 31) / 32;
  TORCH_CHECK(bits.scalar_type() == at::kInt && bits.dim() == 2,
              "msplora: bits must be a 2-D int32 packed mask, got ", bits.scalar_type(), " of shape ", bits.sizes());
  TORCH_CHECK(bits.size(0) == rows && bits.size(1) == words, "msplora: bits must have shape (M, ceil(K / 32)) = (",
              rows, ", ", words, "), got ", bits.sizes());
  TORCH_CHECK(bits.device() == like.device(), "msplora: bits is on ", bits.device(), " but the input is on ", like.device());
}

}  // namespace msplora
