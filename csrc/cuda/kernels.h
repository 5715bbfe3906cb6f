// Raw CUDA kernels of MSPLoRA: pointers, sizes and a stream in, no torch headers,
// so that `nvcc -c` compiles them on a machine without a CUDA build of torch.
// Layouts: every matrix is row-major and contiguous. Each launcher returns the
// launch's cudaError_t for the caller to check. p is the dropout probability as the user
// gave it: the keep scale 1/(1-p) is computed from it in double, as the CPU and Triton
// kernels do, so that all backends scale kept elements by the same float.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace msplora {
namespace cuda {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// T32 (M x R, fp32, zeroed) += dropout(x) (M x K) @ a (K x R), split-K over in_features.
cudaError_t launch_shrink(DType dtype, const void* x, const void* a, float* t32, const int64_t* seed, int64_t M,
                          int64_t K, int64_t R, double p, int64_t split_k, cudaStream_t stream);

// One pass over dy (M x N): dT32 (M x R) += dy @ b^T and dB32 (R x N) += t^T @ dy (both fp32, zeroed).
cudaError_t launch_grad_t_b(DType dtype, const void* dy, const void* t, const void* b, float* dt32, float* db32,
                            int64_t M, int64_t N, int64_t R, int64_t n_splits, cudaStream_t stream);

// dx (M x K) += dropout_mask * (dt (M x R) @ a^T), with a (K x R): the masked LoRA term of dx.
cudaError_t launch_masked_lora_dx(DType dtype, const void* dt, const void* a, void* dx, const int64_t* seed, int64_t M,
                                  int64_t K, int64_t R, double p, cudaStream_t stream);

// dA32 (K x R, fp32, zeroed) += dropout(x)^T @ dt, split over rows.
cudaError_t launch_grad_a_dropout(DType dtype, const void* x, const void* dt, float* da32, const int64_t* seed,
                                  int64_t M, int64_t K, int64_t R, double p, int64_t m_splits, cudaStream_t stream);

// out (M x K) = dropout(x): x * 1/(1-p) where kept, 0 where dropped. out may be x (in place);
// on a tensor of ones it gives the mask itself.
cudaError_t launch_apply_dropout(DType dtype, const void* x, void* out, const int64_t* seed, int64_t M, int64_t K,
                                 double p, cudaStream_t stream);

}  // namespace cuda
}  // namespace msplora
