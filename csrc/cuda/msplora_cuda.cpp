// CUDA launchers of the msplora ops: the big GEMMs go to cuBLAS through ATen
// (the LoRA expand and the LoRA dx term accumulate into the base GEMM's output
// with beta = 1), the skinny and masked parts to our kernels in msplora_kernels.cu,
// or, at large total rank, the skinny products to cuBLAS too (skinny_on_cublas).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../settings.h"
#include "../shape_checks.h"
#include "kernels.h"

namespace msplora {
namespace {

cuda::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "msplora cuda backend: unsupported dtype ", t.scalar_type(),
                  "; use float32, float16 or bfloat16");
  }
}

const int64_t* seed_ptr(double p, const at::Tensor& seed, const at::Tensor& like) {
  if (p == 0.0) return nullptr;
  TORCH_CHECK(seed.device() == like.device(), "msplora: seed is on ", seed.device(), " but the inputs are on ",
              like.device());
  return seed.data_ptr<int64_t>();
}

int64_t sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// Enough blocks for about two waves on the GPU, given the blocks the other grid dims make.
int64_t splits_for(int64_t other_blocks, int64_t max_splits) {
  const int64_t want = (2 * sm_count() + other_blocks - 1) / std::max<int64_t>(other_blocks, 1);
  return std::max<int64_t>(1, std::min(want, max_splits));
}

at::Tensor fp32_zeros(int64_t rows, int64_t cols, const at::Tensor& like) {
  return at::zeros({rows, cols}, like.options().dtype(at::kFloat));
}

// Whether the rank-R products go to cuBLAS (tensor cores), our kernels then only applying the
// mask, instead of to our fused kernels, which do R fp32 FMAs per element on CUDA cores and read
// their input once per 16 ranks. Predicted from a GPU's datasheet rates (bench/cost_model.py), not
// yet timed: in bf16 our kernels turn compute-bound at a few tens of ranks, and at the largest
// ranks cost more passes' worth of time over x or dy than cuBLAS plus a separate mask pass; up to
// R = 64 they stay within that. The cuda_skinny setting (settings.h) may force one way.
constexpr int64_t kMaxKernelRank = 64;

bool skinny_on_cublas(int64_t R) {
  switch (cuda_skinny()) {
    case CudaSkinny::kCublas: return true;
    case CudaSkinny::kKernels: return false;
    default: return R > kMaxKernelRank;
  }
}

// dropout(x) into out, which may be x itself. Both contiguous, of the same shape and dtype.
void apply_dropout(const at::Tensor& x, at::Tensor& out, double p, const at::Tensor& seed) {
  if (out.numel() == 0) return;
  C10_CUDA_CHECK(cuda::launch_apply_dropout(dtype_of(x), x.data_ptr(), out.data_ptr(), seed_ptr(p, seed, x),
                                            x.size(0), x.size(1), p, at::cuda::getCurrentCUDAStream()));
}

// x itself without dropout, else a masked copy.
at::Tensor dropped(const at::Tensor& xc, double p, const at::Tensor& seed) {
  if (p == 0.0) return xc;
  at::Tensor out = at::empty_like(xc);
  apply_dropout(xc, out, p, seed);
  return out;
}

at::Tensor shrink_cuda(const at::Tensor& x, const at::Tensor& a, double p, const at::Tensor& seed) {
  check_shrink_args(x, a, p, seed);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), ac = a.contiguous();
  const int64_t M = x.size(0), K = x.size(1), R = a.size(1);
  if (skinny_on_cublas(R)) return at::mm(dropped(xc, p, seed), ac);
  at::Tensor t32 = fp32_zeros(M, R, x);
  if (M > 0 && K > 0) {
    // Split-K over in_features so that few rows still fill the GPU; fp32 atomics reduce.
    const int64_t split_k = splits_for(((M + 15) / 16) * ((R + 15) / 16), std::max<int64_t>(1, K / 256));
    C10_CUDA_CHECK(cuda::launch_shrink(dtype_of(x), xc.data_ptr(), ac.data_ptr(), t32.data_ptr<float>(),
                                       seed_ptr(p, seed, x), M, K, R, p, split_k,
                                       at::cuda::getCurrentCUDAStream()));
  }
  return t32.to(x.scalar_type());
}

at::Tensor expand_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                              const at::Tensor& t, const at::Tensor& b) {
  check_expand_linear_args(x, weight, bias, t, b);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y;
  if (bias.has_value() && bias->defined()) {
    y = at::addmm(*bias, x, weight.t());
  } else {
    y = at::mm(x, weight.t());
  }
  y.addmm_(t, b);  // cuBLAS with beta = 1: the expand lands in y without another kernel
  return y;
}

std::tuple<at::Tensor, at::Tensor> grad_t_b_cuda(const at::Tensor& dy, const at::Tensor& t, const at::Tensor& b) {
  check_grad_t_b_args(dy, t, b);
  const c10::cuda::CUDAGuard guard(dy.device());
  const at::Tensor dyc = dy.contiguous(), tc = t.contiguous(), bc = b.contiguous();
  const int64_t M = dy.size(0), N = dy.size(1), R = b.size(0);
  if (skinny_on_cublas(R)) return {at::mm(dyc, bc.t()), at::mm(tc.t(), dyc)};
  at::Tensor dt32 = fp32_zeros(M, R, dy), db32 = fp32_zeros(R, N, dy);
  if (M > 0 && N > 0) {
    const int64_t n_splits = splits_for(((M + 127) / 128) * ((R + 15) / 16), std::max<int64_t>(1, N / 512));
    C10_CUDA_CHECK(cuda::launch_grad_t_b(dtype_of(dy), dyc.data_ptr(), tc.data_ptr(), bc.data_ptr(),
                                         dt32.data_ptr<float>(), db32.data_ptr<float>(), M, N, R, n_splits,
                                         at::cuda::getCurrentCUDAStream()));
  }
  return {dt32.to(dy.scalar_type()), db32.to(dy.scalar_type())};
}

at::Tensor grad_x_cuda(const at::Tensor& dy, const at::Tensor& weight, const at::Tensor& dt, const at::Tensor& a,
                       double p, const at::Tensor& seed) {
  check_grad_x_args(dy, weight, dt, a, p, seed);
  const c10::cuda::CUDAGuard guard(dy.device());
  if (p > 0.0 && skinny_on_cublas(a.size(1))) {
    // As on the CPU: the LoRA term first, masked in place, then cuBLAS accumulates dy @ weight into it.
    at::Tensor dx = at::mm(dt, a.t());
    apply_dropout(dx, dx, p, seed);
    dx.addmm_(dy, weight);
    return dx;
  }
  at::Tensor dx = at::mm(dy, weight);
  if (p == 0.0) {
    dx.addmm_(dt, a.t());  // beta = 1 into the cuBLAS output
  } else if (dx.numel() > 0) {
    // Only the LoRA branch saw the dropped input, so its term is masked as it is added.
    const at::Tensor dtc = dt.contiguous(), ac = a.contiguous();
    C10_CUDA_CHECK(cuda::launch_masked_lora_dx(dtype_of(dy), dtc.data_ptr(), ac.data_ptr(), dx.data_ptr(),
                                               seed_ptr(p, seed, dy), dx.size(0), dx.size(1), a.size(1),
                                               p, at::cuda::getCurrentCUDAStream()));
  }
  return dx;
}

at::Tensor grad_a_cuda(const at::Tensor& x, const at::Tensor& dt, double p, const at::Tensor& seed) {
  check_grad_a_args(x, dt, p, seed);
  const c10::cuda::CUDAGuard guard(x.device());
  if (p == 0.0) return at::mm(x.t(), dt);
  const at::Tensor xc = x.contiguous(), dtc = dt.contiguous();
  const int64_t M = x.size(0), K = x.size(1), R = dt.size(1);
  if (skinny_on_cublas(R)) return at::mm(dropped(xc, p, seed).t(), dtc);
  at::Tensor da32 = fp32_zeros(K, R, x);
  if (M > 0 && K > 0) {
    const int64_t m_splits = splits_for(((K + 127) / 128) * ((R + 15) / 16), std::max<int64_t>(1, M / 256));
    C10_CUDA_CHECK(cuda::launch_grad_a_dropout(dtype_of(x), xc.data_ptr(), dtc.data_ptr(), da32.data_ptr<float>(),
                                               seed_ptr(p, seed, x), M, K, R, p, m_splits,
                                               at::cuda::getCurrentCUDAStream()));
  }
  return da32.to(x.scalar_type());
}

at::Tensor dropout_mask_cuda(const at::Tensor& x, double p, const at::Tensor& seed) {
  check_matrix(x, "x");
  check_dropout(p, seed);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::ones({x.size(0), x.size(1)}, x.options());
  if (p > 0.0) apply_dropout(out, out, p, seed);
  return out;
}

at::Tensor dropout_cuda(const at::Tensor& x, double p, const at::Tensor& seed) {
  check_matrix(x, "x");
  check_dropout(p, seed);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  return p == 0.0 ? xc.clone() : dropped(xc, p, seed);
}

}  // namespace

TORCH_LIBRARY_IMPL(msplora, CUDA, m) {
  m.impl("shrink", &shrink_cuda);
  m.impl("expand_linear", &expand_linear_cuda);
  m.impl("grad_t_b", &grad_t_b_cuda);
  m.impl("grad_x", &grad_x_cuda);
  m.impl("grad_a", &grad_a_cuda);
  m.impl("dropout_mask", &dropout_mask_cuda);
  m.impl("dropout", &dropout_cuda);
}

}  // namespace msplora
