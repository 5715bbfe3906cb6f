// CPU kernels of the msplora ops. The GEMMs are libraries' (gemms.h picks a library for each, by
// measurement); what is ours is the fusion: all levels in one shrink and one expand, the base
// GEMMs accumulating into the expand and the LoRA dx term (beta = 1) instead of a separate pass to
// add them, and the dropout mask hashed from a seed, so that no mask is stored (the forward keeps
// dropout(x) for dA: the keeps_dropped_input capability in msplora_kernels/ops/backends.py).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../dropout_hash.h"
#include "../shape_checks.h"
#include "gemms.h"

namespace msplora {
namespace {

// The keep flags (1 kept, 0 dropped) of elements first..first+n-1. Branch-free so it vectorizes;
// GCC clones it for AVX-512 and AVX2 and picks one at load time, so a portable build still runs
// the hash at vector speed (a 4096 x 768 mask: 7.7 ms scalar, 1.2 ms with AVX-512, 2 threads).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
void keep_flags(float* out, int64_t n, uint64_t seed, uint64_t first, float p) {
  for (int64_t i = 0; i < n; ++i) {
    out[i] = uniform01(seed, first + static_cast<uint64_t>(i)) >= p ? 1.0f : 0.0f;
  }
}

// out = src * mask (out may alias src). src and out are contiguous (rows, cols), and element i
// gets the mask of element i of the logical input.
void apply_dropout_cpu(const at::Tensor& src, at::Tensor& out, double p, int64_t seed) {
  constexpr int64_t kBlock = 2048;
  const int64_t n = src.numel();
  const float pf = static_cast<float>(p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "msplora_dropout", [&] {
    // Multiply in the op-math type so float64 inputs keep their precision.
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t keep_scale = static_cast<acc_t>(1.0 / (1.0 - p));
    const scalar_t* in = src.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, 1 << 14, [&](int64_t begin, int64_t end) {
      float keep[kBlock];
      for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
        const int64_t len = std::min(kBlock, end - b0);
        keep_flags(keep, len, static_cast<uint64_t>(seed), static_cast<uint64_t>(b0), pf);
        for (int64_t j = 0; j < len; ++j) {
          o[b0 + j] = static_cast<scalar_t>(static_cast<acc_t>(in[b0 + j]) * (static_cast<acc_t>(keep[j]) * keep_scale));
        }
      }
    });
  });
}

int64_t read_seed(double p, const at::Tensor& seed) {
  return p > 0.0 ? seed.item<int64_t>() : 0;
}

at::Tensor dropped(const at::Tensor& x, double p, const at::Tensor& seed) {
  at::Tensor xc = x.contiguous();
  if (p == 0.0) return xc;
  at::Tensor out = at::empty_like(xc);
  apply_dropout_cpu(xc, out, p, read_seed(p, seed));
  return out;
}

at::Tensor shrink_cpu(const at::Tensor& x, const at::Tensor& a, double p, const at::Tensor& seed) {
  check_shrink_args(x, a, p, seed);
  return product("shrink: x A", dropped(x, p, seed), a);
}

at::Tensor expand_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                             const at::Tensor& t, const at::Tensor& b) {
  check_expand_linear_args(x, weight, bias, t, b);
  // The skinny expand (and the bias) first, then the base GEMM accumulates into it, so the LoRA
  // term costs no extra pass over y.
  return frozen_linear_add("frozen: x W^T", x.contiguous(), weight, bias,
                           product("expand: T B", t, b, /*transposable=*/false));
}

std::tuple<at::Tensor, at::Tensor> grad_t_b_cpu(const at::Tensor& dy, const at::Tensor& t, const at::Tensor& b) {
  check_grad_t_b_args(dy, t, b);
  return {product("grad: dT = dy B^T", dy, b.t()), product("grad: dB = T^T dy", t.t(), dy)};
}

at::Tensor grad_x_cpu(const at::Tensor& dy, const at::Tensor& weight, const at::Tensor& dt, const at::Tensor& a,
                      double p, const at::Tensor& seed) {
  check_grad_x_args(dy, weight, dt, a, p, seed);
  // As in the forward: the skinny term first, the big GEMM accumulating into it. Only the LoRA
  // branch saw the dropped input, so the mask applies to that term alone, before the GEMM.
  at::Tensor dx = product("grad: dT A^T", dt, a.t(), /*transposable=*/false);
  if (p > 0.0) apply_dropout_cpu(dx, dx, p, read_seed(p, seed));
  return frozen_linear_add("frozen: dy W", dy.contiguous(), weight.t(), c10::nullopt, dx);
}

at::Tensor grad_a_cpu(const at::Tensor& x, const at::Tensor& dt, double p, const at::Tensor& seed) {
  check_grad_a_args(x, dt, p, seed);
  return product("grad: dA = x^T dT", dropped(x, p, seed).t(), dt);
}

at::Tensor dropout_mask_cpu(const at::Tensor& x, double p, const at::Tensor& seed) {
  check_dropout(p, seed);
  at::Tensor ones = at::ones(x.sizes(), x.options());
  if (p == 0.0) return ones;
  apply_dropout_cpu(ones, ones, p, read_seed(p, seed));
  return ones;
}

at::Tensor dropout_cpu(const at::Tensor& x, double p, const at::Tensor& seed) {
  check_matrix(x, "x");
  check_dropout(p, seed);
  // Never an alias of x, even at p = 0: the schema promises a new tensor.
  return p == 0.0 ? x.contiguous().clone() : dropped(x, p, seed);
}

}  // namespace

// What gemms.h has chosen so far, one line per GEMM and shape class, and a way to choose anew.
TORCH_LIBRARY_FRAGMENT(msplora, m) {
  m.def("gemm_choices() -> str", &gemm_choices);
  m.def("forget_gemm_choices() -> ()", &forget_gemm_choices);
}

TORCH_LIBRARY_IMPL(msplora, CPU, m) {
  m.impl("shrink", &shrink_cpu);
  m.impl("expand_linear", &expand_linear_cpu);
  m.impl("grad_t_b", &grad_t_b_cpu);
  m.impl("grad_x", &grad_x_cpu);
  m.impl("grad_a", &grad_a_cpu);
  m.impl("dropout_mask", &dropout_mask_cpu);
  m.impl("dropout", &dropout_cpu);
}

}  // namespace msplora
