// The adapter's rank-R products on the CPU (x A, dy B^T, T^T dy, dT A^T, dT^T x, T B), and which
// GEMM library runs them. The frozen layer's GEMMs are not here: they stay on at::addmm, as
// nn.Linear's do.
//
// fp32 products may go to oneDNN through mkldnn::_linear_pointwise, the op inductor emits for CPU
// linears: on an AMD EPYC it runs these skinny shapes 2-4x faster than at::mm (MKL), 1.0-1.3 ms
// against 2.4-2.9 ms each at 512 x 4096, R = 112 (bench/NOTES.md). The cpu_gemm setting chooses.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <optional>

#include "../settings.h"

namespace msplora {

// Below about a million multiply-adds oneDNN's per-call setup costs more than it saves (measured:
// 16 x 64 x 14 takes 3 us on at::mm and 12 us on oneDNN; they meet near 128 x 256 x 14).
constexpr int64_t kOneDnnMinMacs = int64_t{1} << 20;

inline const std::optional<c10::OperatorHandle>& onednn_linear_op() {
  static const std::optional<c10::OperatorHandle> op =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  return op;
}

// Python resolves the choice (msplora_kernels/ops/backends.py: cpu_adapter_gemm) and sets it in
// settings.h; it asks for oneDNN only where torch has the op.
inline bool onednn_enabled() { return cpu_gemm() == CpuGemm::kOneDnn && onednn_linear_op().has_value(); }

// Whether a @ b runs on oneDNN.
inline bool on_onednn(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && a.numel() > 0 && b.numel() > 0 &&
         a.size(0) * a.size(1) * b.size(1) >= kOneDnnMinMacs && onednn_enabled();
}

// x w^T (+ bias) on oneDNN. Called boxed: the op's C++ signature types differ between torch versions.
inline at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  torch::jit::Stack stack;
  stack.reserve(6);
  stack.emplace_back(x);
  stack.emplace_back(w);
  stack.emplace_back(bias.has_value() && bias->defined() ? c10::IValue(*bias) : c10::IValue());
  stack.emplace_back(std::string("none"));
  stack.emplace_back(c10::List<std::optional<at::Scalar>>());
  stack.emplace_back(c10::IValue());
  onednn_linear_op()->callBoxed(&stack);
  return stack.back().toTensor();
}

// a @ b. Each library has its faster orientation per product (measured at both bench shapes):
// transposed computes (b^T a^T)^T and returns it as a column-major view.
inline at::Tensor rank_product(const at::Tensor& a, const at::Tensor& b, bool transposed_on_mkl,
                               bool transposed_on_onednn) {
  if (on_onednn(a, b)) {
    return transposed_on_onednn ? onednn_linear(b.t(), a, c10::nullopt).t() : onednn_linear(a, b.t(), c10::nullopt);
  }
  return transposed_on_mkl ? at::mm(b.t(), a.t()).t() : at::mm(a, b);
}

// t b + bias, contiguous, for the frozen GEMM to accumulate into.
inline at::Tensor expand_with_bias(const at::Tensor& t, const at::Tensor& b, const c10::optional<at::Tensor>& bias) {
  const bool has_bias = bias.has_value() && bias->defined();
  if (on_onednn(t, b)) return onednn_linear(t, b.t(), bias);
  return has_bias ? at::addmm(*bias, t, b) : at::mm(t, b);
}

}  // namespace msplora
