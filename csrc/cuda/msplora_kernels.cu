// CUDA kernels for the parts of MSPLoRA where cuBLAS is poor: the skinny shrink
// over all levels at once, the one-pass dy kernel giving dT and dB together, and
// the dropout-masked terms. The big GEMMs stay with cuBLAS (see msplora_cuda.cpp).
// All indexing is int64; all accumulation is fp32.
#include <algorithm>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../dropout_hash.h"
#include "kernels.h"

namespace msplora {
namespace cuda {
namespace {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float dropped(float v, uint64_t seed, int64_t index, float p, float keep_scale) {
  return uniform01(seed, static_cast<uint64_t>(index)) >= p ? v * keep_scale : 0.0f;
}

__device__ __forceinline__ uint64_t load_seed(const int64_t* seed, float p) {
  return p > 0.0f ? static_cast<uint64_t>(*seed) : 0;
}

template <typename F>
cudaError_t dispatch(DType dtype, F&& launch) {
  switch (dtype) {
    case DType::kFloat32: launch(float{}); break;
    case DType::kFloat16: launch(__half{}); break;
    case DType::kBFloat16: launch(__nv_bfloat16{}); break;
  }
  return cudaGetLastError();
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- shrink: each warp owns SHRINK_ROWS rows and a rank tile; lanes stride over its K-slice.
constexpr int SHRINK_WARPS = 4;
constexpr int SHRINK_ROWS = 4;
constexpr int RANK_TILE = 16;

template <typename T>
__global__ void __launch_bounds__(SHRINK_WARPS * 32) shrink_kernel(const T* __restrict__ x, const T* __restrict__ a,
                                                                   float* __restrict__ t32, const int64_t* seed_ptr,
                                                                   int64_t M, int64_t K, int64_t R, int64_t k_chunk,
                                                                   float p, float keep_scale) {
  const int lane = threadIdx.x & 31;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * SHRINK_WARPS + (threadIdx.x >> 5)) * SHRINK_ROWS;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * k_chunk;
  const int64_t k_end = min(K, k_begin + k_chunk);
  const int64_t r0 = static_cast<int64_t>(blockIdx.z) * RANK_TILE;
  const uint64_t seed = load_seed(seed_ptr, p);
  float acc[SHRINK_ROWS][RANK_TILE];
#pragma unroll
  for (int i = 0; i < SHRINK_ROWS; ++i)
#pragma unroll
    for (int j = 0; j < RANK_TILE; ++j) acc[i][j] = 0.0f;

  for (int64_t k = k_begin + lane; k < k_end; k += 32) {
    float av[RANK_TILE];
#pragma unroll
    for (int j = 0; j < RANK_TILE; ++j) av[j] = (r0 + j < R) ? to_float(a[k * R + r0 + j]) : 0.0f;
#pragma unroll
    for (int i = 0; i < SHRINK_ROWS; ++i) {
      const int64_t row = row0 + i;
      if (row < M) {
        float xv = to_float(x[row * K + k]);
        if (p > 0.0f) xv = dropped(xv, seed, row * K + k, p, keep_scale);
#pragma unroll
        for (int j = 0; j < RANK_TILE; ++j) acc[i][j] = fmaf(xv, av[j], acc[i][j]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < SHRINK_ROWS; ++i) {
#pragma unroll
    for (int j = 0; j < RANK_TILE; ++j) {
      float v = acc[i][j];
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
      const int64_t row = row0 + i;
      if (lane == 0 && row < M && r0 + j < R) atomicAdd(&t32[row * R + r0 + j], v);
    }
  }
}

// ---- grad_t_b: a block owns GTB_ROWS rows and a rank tile, and walks its column slice of dy
// once through shared memory, accumulating dT for its rows and dB for each column tile.
constexpr int GTB_ROWS = 128;
constexpr int GTB_COLS = 64;
constexpr int GTB_THREADS = 256;

template <typename T>
__global__ void __launch_bounds__(GTB_THREADS) grad_t_b_kernel(const T* __restrict__ dy, const T* __restrict__ t,
                                                              const T* __restrict__ b, float* __restrict__ dt32,
                                                              float* __restrict__ db32, int64_t M, int64_t N,
                                                              int64_t R, int64_t n_chunk) {
  __shared__ float dy_s[GTB_ROWS][GTB_COLS + 1];
  __shared__ float t_s[GTB_ROWS][RANK_TILE];
  __shared__ float b_s[RANK_TILE][GTB_COLS + 1];
  const int tid = threadIdx.x;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * GTB_ROWS;
  const int64_t n_begin = static_cast<int64_t>(blockIdx.y) * n_chunk;
  const int64_t n_end = min(N, n_begin + n_chunk);
  const int64_t r0 = static_cast<int64_t>(blockIdx.z) * RANK_TILE;

  for (int idx = tid; idx < GTB_ROWS * RANK_TILE; idx += GTB_THREADS) {
    const int i = idx / RANK_TILE, j = idx % RANK_TILE;
    t_s[i][j] = (m0 + i < M && r0 + j < R) ? to_float(t[(m0 + i) * R + r0 + j]) : 0.0f;
  }
  // dT: thread owns row tid/2 and 8 ranks. dB: thread owns rank tid/16 and 4 columns.
  const int dt_row = tid >> 1, dt_j0 = (tid & 1) * 8;
  const int db_j = tid >> 4, db_c0 = (tid & 15) * 4;
  float dt_acc[8];
#pragma unroll
  for (int q = 0; q < 8; ++q) dt_acc[q] = 0.0f;

  for (int64_t n0 = n_begin; n0 < n_end; n0 += GTB_COLS) {
    __syncthreads();
    for (int idx = tid; idx < GTB_ROWS * GTB_COLS; idx += GTB_THREADS) {
      const int i = idx / GTB_COLS, c = idx % GTB_COLS;
      dy_s[i][c] = (m0 + i < M && n0 + c < n_end) ? to_float(dy[(m0 + i) * N + n0 + c]) : 0.0f;
    }
    for (int idx = tid; idx < RANK_TILE * GTB_COLS; idx += GTB_THREADS) {
      const int j = idx / GTB_COLS, c = idx % GTB_COLS;
      b_s[j][c] = (r0 + j < R && n0 + c < n_end) ? to_float(b[(r0 + j) * N + n0 + c]) : 0.0f;
    }
    __syncthreads();
    for (int c = 0; c < GTB_COLS; ++c) {
      const float d = dy_s[dt_row][c];
#pragma unroll
      for (int q = 0; q < 8; ++q) dt_acc[q] = fmaf(d, b_s[dt_j0 + q][c], dt_acc[q]);
    }
    float db_acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int i = 0; i < GTB_ROWS; ++i) {
      const float tv = t_s[i][db_j];
#pragma unroll
      for (int q = 0; q < 4; ++q) db_acc[q] = fmaf(tv, dy_s[i][db_c0 + q], db_acc[q]);
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t n = n0 + db_c0 + q;
      if (n < n_end && r0 + db_j < R) atomicAdd(&db32[(r0 + db_j) * N + n], db_acc[q]);
    }
  }
#pragma unroll
  for (int q = 0; q < 8; ++q) {
    const int64_t m = m0 + dt_row, r = r0 + dt_j0 + q;
    if (m < M && r < R) atomicAdd(&dt32[m * R + r], dt_acc[q]);
  }
}

// ---- masked LoRA dx: thread owns one column k for LDX_ROWS rows; dt rows are staged in shared memory.
constexpr int LDX_ROWS = 16;
constexpr int LDX_COLS = 128;
constexpr int LDX_RCHUNK = 32;

template <typename T>
__global__ void __launch_bounds__(LDX_COLS) masked_lora_dx_kernel(const T* __restrict__ dt, const T* __restrict__ a,
                                                                  T* __restrict__ dx, const int64_t* seed_ptr,
                                                                  int64_t M, int64_t K, int64_t R, float p,
                                                                  float keep_scale) {
  __shared__ float dt_s[LDX_ROWS][LDX_RCHUNK];
  const int tid = threadIdx.x;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * LDX_ROWS;
  const int64_t k = static_cast<int64_t>(blockIdx.y) * LDX_COLS + tid;
  const uint64_t seed = load_seed(seed_ptr, p);
  float acc[LDX_ROWS];
#pragma unroll
  for (int i = 0; i < LDX_ROWS; ++i) acc[i] = 0.0f;
  for (int64_t r0 = 0; r0 < R; r0 += LDX_RCHUNK) {
    __syncthreads();
    for (int idx = tid; idx < LDX_ROWS * LDX_RCHUNK; idx += LDX_COLS) {
      const int i = idx / LDX_RCHUNK, j = idx % LDX_RCHUNK;
      dt_s[i][j] = (m0 + i < M && r0 + j < R) ? to_float(dt[(m0 + i) * R + r0 + j]) : 0.0f;
    }
    __syncthreads();
    if (k < K) {
      for (int j = 0; j < LDX_RCHUNK && r0 + j < R; ++j) {
        const float av = to_float(a[k * R + r0 + j]);
#pragma unroll
        for (int i = 0; i < LDX_ROWS; ++i) acc[i] = fmaf(dt_s[i][j], av, acc[i]);
      }
    }
  }
  if (k >= K) return;
#pragma unroll
  for (int i = 0; i < LDX_ROWS; ++i) {
    const int64_t m = m0 + i;
    if (m < M) {
      const int64_t idx = m * K + k;
      dx[idx] = from_float<T>(to_float(dx[idx]) + dropped(acc[i], seed, idx, p, keep_scale));
    }
  }
}

// ---- dA with dropout: thread owns one column k and a rank tile over its slice of rows.
constexpr int GA_COLS = 128;
constexpr int GA_ROWS = 32;

template <typename T>
__global__ void __launch_bounds__(GA_COLS) grad_a_dropout_kernel(const T* __restrict__ x, const T* __restrict__ dt,
                                                                 float* __restrict__ da32, const int64_t* seed_ptr,
                                                                 int64_t M, int64_t K, int64_t R, int64_t m_chunk,
                                                                 float p, float keep_scale) {
  __shared__ float dt_s[GA_ROWS][RANK_TILE];
  const int tid = threadIdx.x;
  const int64_t k = static_cast<int64_t>(blockIdx.x) * GA_COLS + tid;
  const int64_t m_begin = static_cast<int64_t>(blockIdx.y) * m_chunk;
  const int64_t m_end = min(M, m_begin + m_chunk);
  const int64_t r0 = static_cast<int64_t>(blockIdx.z) * RANK_TILE;
  const uint64_t seed = load_seed(seed_ptr, p);
  float acc[RANK_TILE];
#pragma unroll
  for (int j = 0; j < RANK_TILE; ++j) acc[j] = 0.0f;
  for (int64_t mb = m_begin; mb < m_end; mb += GA_ROWS) {
    __syncthreads();
    for (int idx = tid; idx < GA_ROWS * RANK_TILE; idx += GA_COLS) {
      const int i = idx / RANK_TILE, j = idx % RANK_TILE;
      dt_s[i][j] = (mb + i < m_end && r0 + j < R) ? to_float(dt[(mb + i) * R + r0 + j]) : 0.0f;
    }
    __syncthreads();
    if (k < K) {
      for (int i = 0; i < GA_ROWS && mb + i < m_end; ++i) {
        const int64_t m = mb + i;
        const float xv = dropped(to_float(x[m * K + k]), seed, m * K + k, p, keep_scale);
#pragma unroll
        for (int j = 0; j < RANK_TILE; ++j) acc[j] = fmaf(xv, dt_s[i][j], acc[j]);
      }
    }
  }
  if (k >= K) return;
#pragma unroll
  for (int j = 0; j < RANK_TILE; ++j) {
    if (r0 + j < R) atomicAdd(&da32[k * R + r0 + j], acc[j]);
  }
}

// No __restrict__: out may alias x.
template <typename T>
__global__ void apply_dropout_kernel(const T* x, T* out, const int64_t* seed_ptr, int64_t n, float p, float keep_scale) {
  const uint64_t seed = load_seed(seed_ptr, p);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = from_float<T>(dropped(to_float(x[i]), seed, i, p, keep_scale));
  }
}

// In double from the user's p, as the CPU and Triton kernels compute it, so all scale alike.
float keep_scale_of(double p) { return static_cast<float>(1.0 / (1.0 - p)); }

// Grid-stride elementwise launches: enough 256-thread blocks to cover n, at most 65535.
unsigned elementwise_blocks(int64_t n) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, 256), 65535)));
}

}  // namespace

cudaError_t launch_shrink(DType dtype, const void* x, const void* a, float* t32, const int64_t* seed, int64_t M,
                          int64_t K, int64_t R, double p, int64_t split_k, cudaStream_t stream) {
  const int64_t k_chunk = ceil_div(ceil_div(K, split_k), 32) * 32;
  const dim3 grid(static_cast<unsigned>(ceil_div(M, SHRINK_WARPS * SHRINK_ROWS)),
                  static_cast<unsigned>(ceil_div(K, k_chunk)), static_cast<unsigned>(ceil_div(R, RANK_TILE)));
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    shrink_kernel<T><<<grid, SHRINK_WARPS * 32, 0, stream>>>(static_cast<const T*>(x), static_cast<const T*>(a), t32,
                                                              seed, M, K, R, k_chunk, static_cast<float>(p),
                                                              keep_scale_of(p));
  });
}

cudaError_t launch_grad_t_b(DType dtype, const void* dy, const void* t, const void* b, float* dt32, float* db32,
                            int64_t M, int64_t N, int64_t R, int64_t n_splits, cudaStream_t stream) {
  const int64_t n_chunk = ceil_div(ceil_div(N, n_splits), GTB_COLS) * GTB_COLS;
  const dim3 grid(static_cast<unsigned>(ceil_div(M, GTB_ROWS)), static_cast<unsigned>(ceil_div(N, n_chunk)),
                  static_cast<unsigned>(ceil_div(R, RANK_TILE)));
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    grad_t_b_kernel<T><<<grid, GTB_THREADS, 0, stream>>>(static_cast<const T*>(dy), static_cast<const T*>(t),
                                                          static_cast<const T*>(b), dt32, db32, M, N, R, n_chunk);
  });
}

cudaError_t launch_masked_lora_dx(DType dtype, const void* dt, const void* a, void* dx, const int64_t* seed, int64_t M,
                                  int64_t K, int64_t R, double p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(M, LDX_ROWS)), static_cast<unsigned>(ceil_div(K, LDX_COLS)));
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    masked_lora_dx_kernel<T><<<grid, LDX_COLS, 0, stream>>>(static_cast<const T*>(dt), static_cast<const T*>(a),
                                                             static_cast<T*>(dx), seed, M, K, R, static_cast<float>(p),
                                                             keep_scale_of(p));
  });
}

cudaError_t launch_grad_a_dropout(DType dtype, const void* x, const void* dt, float* da32, const int64_t* seed,
                                  int64_t M, int64_t K, int64_t R, double p, int64_t m_splits, cudaStream_t stream) {
  const int64_t m_chunk = ceil_div(ceil_div(M, m_splits), GA_ROWS) * GA_ROWS;
  const dim3 grid(static_cast<unsigned>(ceil_div(K, GA_COLS)), static_cast<unsigned>(ceil_div(M, m_chunk)),
                  static_cast<unsigned>(ceil_div(R, RANK_TILE)));
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    grad_a_dropout_kernel<T><<<grid, GA_COLS, 0, stream>>>(static_cast<const T*>(x), static_cast<const T*>(dt), da32,
                                                            seed, M, K, R, m_chunk, static_cast<float>(p),
                                                            keep_scale_of(p));
  });
}

cudaError_t launch_apply_dropout(DType dtype, const void* x, void* out, const int64_t* seed, int64_t M, int64_t K,
                                 double p, cudaStream_t stream) {
  const int64_t n = M * K;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    apply_dropout_kernel<T><<<elementwise_blocks(n), 256, 0, stream>>>(static_cast<const T*>(x), static_cast<T*>(out),
                                                                        seed, n, static_cast<float>(p),
                                                                        keep_scale_of(p));
  });
}

}  // namespace cuda
}  // namespace msplora
