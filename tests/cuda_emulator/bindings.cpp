// C entry points to the launchers of csrc/cuda/kernels.h, for ctypes: the test passes host
// pointers, which the emulated kernels read and write directly; the stream is unused.
#include "kernels.h"

using msplora::cuda::DType;

extern "C" {

int emu_shrink(int dtype, const void* x, const void* a, float* t32, const int64_t* seed, int64_t M, int64_t K,
               int64_t R, double p, int64_t split_k) {
  return msplora::cuda::launch_shrink(static_cast<DType>(dtype), x, a, t32, seed, M, K, R, p, split_k, nullptr);
}

int emu_grad_t_b(int dtype, const void* dy, const void* t, const void* b, float* dt32, float* db32, int64_t M,
                 int64_t N, int64_t R, int64_t n_splits) {
  return msplora::cuda::launch_grad_t_b(static_cast<DType>(dtype), dy, t, b, dt32, db32, M, N, R, n_splits, nullptr);
}

int emu_masked_lora_dx(int dtype, const void* dt, const void* a, void* dx, const int64_t* seed, int64_t M, int64_t K,
                       int64_t R, double p) {
  return msplora::cuda::launch_masked_lora_dx(static_cast<DType>(dtype), dt, a, dx, seed, M, K, R, p, nullptr);
}

int emu_grad_a_dropout(int dtype, const void* x, const void* dt, float* da32, const int64_t* seed, int64_t M,
                       int64_t K, int64_t R, double p, int64_t m_splits) {
  return msplora::cuda::launch_grad_a_dropout(static_cast<DType>(dtype), x, dt, da32, seed, M, K, R, p, m_splits,
                                              nullptr);
}

int emu_apply_dropout(int dtype, const void* x, void* out, const int64_t* seed, int64_t M, int64_t K, double p) {
  return msplora::cuda::launch_apply_dropout(static_cast<DType>(dtype), x, out, seed, M, K, p, nullptr);
}

}  // extern "C"
