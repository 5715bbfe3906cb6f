// CPU kernels of the msplora ops. The GEMMs are libraries' (gemms.h picks a library for each, by
// measurement); what is ours is the fusion: all levels in one shrink and one expand, the expand
// and dx's masked LoRA term added in one pass into the frozen GEMM's output while it is still in
// cache, and the dropout mask hashed from a seed, so that no mask is stored (the forward keeps
// dropout(x) for dA: the keeps_dropped_input capability in msplora_kernels/ops/backends.py).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../shape_checks.h"
#include "expand_bf16.h"
#include "fused_expand.h"
#include "gemms.h"
#include "masking.h"
#include "thin_product.h"

namespace msplora {
namespace {

// out = src * mask (out may alias src), src and out contiguous (rows, cols); with bits_out, the
// mask is packed there too.
void apply_dropout_cpu(const at::Tensor& src, at::Tensor& out, double p, int64_t seed, at::Tensor* bits_out = nullptr) {
  masking::MaskJob job;
  job.p = p;
  job.seed = static_cast<uint64_t>(seed);
  job.bits_out = bits_out ? bits_out->data_ptr<int32_t>() : nullptr;
  masking::run(job, src, out, src.size(0), src.size(1));
}

// out = src * the mask that `bits` hold.
void apply_bits_cpu(const at::Tensor& src, at::Tensor& out, const at::Tensor& bits, double p) {
  masking::MaskJob job;
  job.p = p;
  job.bits_in = bits.data_ptr<int32_t>();
  masking::run(job, src, out, src.size(0), src.size(1));
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

// out += mask * (t b), in place, the mask from job.bits_in, or hashed from job.seed, or none at
// p = 0: our kernel in one pass over out (expand_bf16.h's in bf16 on CPUs with AVX512-BF16,
// else fused_expand.h's), or a library's product (ATen's addmm_ straight into out where there is
// no mask; else into a temporary, masked, then added), whichever was measured faster for this
// shape class. out is the frozen GEMM's new row-major (M, N) output.
void add_expanded(const char* gemm, at::Tensor& out, const at::Tensor& t, const at::Tensor& b,
                  const masking::MaskJob& mask) {
  if (out.numel() == 0 || t.size(1) == 0) return;
  const at::ScalarType dtype = t.scalar_type();
  // fp64 keeps its precision on the library: the kernel accumulates in fp32.
  const bool fusable = (dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf) &&
                       t.size(1) <= fused_expand::kMaxRank;
  auto fused = [&](at::Tensor& into) {
    if (expand_bf16::applies(into, t, b)) return expand_bf16::run(into, t, b, mask);
    const int64_t cols = b.size(1);
    const int64_t padded = (cols + fused_expand::kCols - 1) / fused_expand::kCols * fused_expand::kCols;
    at::Tensor b32 = at::zeros({b.size(0), padded}, b.options().dtype(at::kFloat));
    b32.narrow(1, 0, cols).copy_(b);
    at::Tensor tc = t.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "msplora_fused_expand", [&] {
      fused_expand::run(into.data_ptr<scalar_t>(), tc.data_ptr<scalar_t>(), t.size(0), t.size(1), b32.data_ptr<float>(),
                        cols, mask);
    });
  };
  auto library = [&](const Candidate& c, at::Tensor& into) {
    if (mask.p == 0.0 && !c.onednn) {
      into.addmm_(t, b);
      return;
    }
    at::Tensor term = product_with(c, t, b).contiguous();
    if (mask.p > 0.0) masking::run(mask, term, term, term.size(0), term.size(1));
    into.add_(term);
  };
  at::Tensor scratch;  // what the candidates add into while timed, so that timing leaves out as it was
  const Candidate c = choose(gemm, dtype, t.size(0), t.size(1), b.size(1), /*transposable=*/false,
                             [&](const Candidate& cand) {
                               if (!scratch.defined()) scratch = out.clone();
                               cand.fused ? fused(scratch) : library(cand, scratch);
                             },
                             fusable);
  c.fused && fusable ? fused(out) : library(c, out);
}

at::Tensor shrink_cpu(const at::Tensor& x, const at::Tensor& a, double p, const at::Tensor& seed) {
  check_shrink_args(x, a, p, seed);
  return product("shrink: x A", dropped(x, p, seed), a);
}

at::Tensor expand_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                             const at::Tensor& t, const at::Tensor& b) {
  check_expand_linear_args(x, weight, bias, t, b);
  at::Tensor y = frozen_linear("frozen: x W^T", x.contiguous(), weight, bias);
  add_expanded("expand: T B", y, t, b, masking::MaskJob{});
  return y;
}

std::tuple<at::Tensor, at::Tensor> grad_t_b_cpu(const at::Tensor& dy, const at::Tensor& t, const at::Tensor& b) {
  check_grad_t_b_args(dy, t, b);
  auto separate = [&]() -> std::tuple<at::Tensor, at::Tensor> {
    return {product("grad: dT = dy B^T", dy, b.t()), product("grad: dB = T^T dy", t.t(), dy)};
  };
  // Both read dy: in bf16 our kernel can compute them in one pass over it.
  if (!thin_product::grads_apply(dy, t, b)) return separate();
  const bool ours = one_pass("grad: dT and dB in one pass over dy", dy.scalar_type(), dy.size(0), dy.size(1), t.size(1),
                             [&](const Candidate& c) { c.thin ? thin_product::grads(dy, t, b) : separate(); });
  return ours ? thin_product::grads(dy, t, b) : separate();
}

// dx = dy W + mask * (dt a^T), the mask from a seed or from bits (grad_x and grad_x_bits).
at::Tensor dy_w_plus_masked_term(const at::Tensor& dy, const at::Tensor& weight, const at::Tensor& dt,
                                 const at::Tensor& a, const masking::MaskJob& mask) {
  at::Tensor dx = frozen_linear("frozen: dy W", dy.contiguous(), weight.t(), c10::nullopt);
  // Chosen apart: without a mask a library adds the product straight into dx, with one it needs
  // a temporary and a pass more, and the fastest candidate differs (the masked choice, kept for
  // both, made the unmasked term twice as slow as ATen's addmm_ on a CPU with AMX).
  add_expanded(mask.p > 0.0 ? "grad: mask * (dT A^T)" : "grad: dT A^T", dx, dt, a.t(), mask);
  return dx;
}

at::Tensor grad_x_cpu(const at::Tensor& dy, const at::Tensor& weight, const at::Tensor& dt, const at::Tensor& a,
                      double p, const at::Tensor& seed) {
  check_grad_x_args(dy, weight, dt, a, p, seed);
  // Only the LoRA branch saw the dropped input, so the mask applies to its term alone.
  masking::MaskJob mask;
  mask.p = p;
  mask.seed = static_cast<uint64_t>(read_seed(p, seed));
  return dy_w_plus_masked_term(dy, weight, dt, a, mask);
}

at::Tensor grad_a_cpu(const at::Tensor& x, const at::Tensor& dt, double p, const at::Tensor& seed) {
  check_grad_a_args(x, dt, p, seed);
  return product("grad: dA = x^T dT", dropped(x, p, seed).t(), dt);
}

// The one-mask-pass ops (the keeps_mask_bits capability): the forward packs the mask it draws,
// and the backward applies those bits instead of hashing every element again.
std::tuple<at::Tensor, at::Tensor> dropout_keep_mask_cpu(const at::Tensor& x, double p, const at::Tensor& seed) {
  check_matrix(x, "x");
  check_dropout(p, seed);
  at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  at::Tensor bits = at::empty({xc.size(0), (xc.size(1) + masking::kWordBits - 1) / masking::kWordBits},
                              xc.options().dtype(at::kInt));
  if (p == 0.0) {
    out.copy_(xc);
    masking::MaskJob all_kept;  // p = 0 keeps everything: the bits of an all-ones mask
    all_kept.bits_out = bits.data_ptr<int32_t>();
    at::Tensor none;
    masking::run(all_kept, none, none, xc.size(0), xc.size(1));
  } else {
    apply_dropout_cpu(xc, out, p, read_seed(p, seed), &bits);
  }
  return {out, bits};
}

std::tuple<at::Tensor, at::Tensor> shrink_keep_mask_cpu(const at::Tensor& x, const at::Tensor& a, double p,
                                                        const at::Tensor& seed) {
  check_shrink_args(x, a, p, seed);
  auto [dropped_x, bits] = dropout_keep_mask_cpu(x, p, seed);
  return {product("shrink: x A", dropped_x, a), bits};
}

at::Tensor grad_x_bits_cpu(const at::Tensor& dy, const at::Tensor& weight, const at::Tensor& dt, const at::Tensor& a,
                           const at::Tensor& bits, double p) {
  check_grad_x_shapes(dy, weight, dt, a);
  check_p(p);
  check_bits(bits, dy, dy.size(0), weight.size(1));
  at::Tensor words = bits.contiguous();
  masking::MaskJob mask;
  mask.p = p;
  mask.bits_in = words.data_ptr<int32_t>();
  return dy_w_plus_masked_term(dy, weight, dt, a, mask);
}

at::Tensor grad_a_bits_cpu(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& bits, double p) {
  check_grad_a_shapes(x, dt);
  check_p(p);
  check_bits(bits, x, x.size(0), x.size(1));
  at::Tensor xc = x.contiguous();
  if (p == 0.0) return product("grad: dA = x^T dT", xc.t(), dt);
  at::Tensor dropped_x = at::empty_like(xc);
  apply_bits_cpu(xc, dropped_x, bits.contiguous(), p);
  return product("grad: dA = x^T dT", dropped_x.t(), dt);
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

// What gemms.h has chosen so far, one line per GEMM and shape class, and a way to choose anew
// (in this process: the choice store keeps what it holds); the store's file, set from Python
// (the cpu_gemm_store setting), "" for none.
TORCH_LIBRARY_FRAGMENT(msplora, m) {
  m.def("gemm_choices() -> str", &gemm_choices);
  m.def("forget_gemm_choices() -> ()", &forget_gemm_choices);
  m.def("set_gemm_choice_file(str path) -> ()", [](std::string path) { choice_store::set_path(path); });
  m.def("gemm_choice_file() -> str", []() { return choice_store::path(); });
}

TORCH_LIBRARY_IMPL(msplora, CPU, m) {
  m.impl("shrink", &shrink_cpu);
  m.impl("expand_linear", &expand_linear_cpu);
  m.impl("grad_t_b", &grad_t_b_cpu);
  m.impl("grad_x", &grad_x_cpu);
  m.impl("grad_a", &grad_a_cpu);
  m.impl("dropout_mask", &dropout_mask_cpu);
  m.impl("dropout", &dropout_cpu);
  m.impl("dropout_keep_mask", &dropout_keep_mask_cpu);
  m.impl("shrink_keep_mask", &shrink_keep_mask_cpu);
  m.impl("grad_x_bits", &grad_x_bits_cpu);
  m.impl("grad_a_bits", &grad_a_bits_cpu);
}

}  // namespace msplora
