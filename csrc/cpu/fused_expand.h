// Our kernel for the rank-R products that add into a whole (M, N) tensor: out += mask * (t b),
// with t (M x R) and b (R x N), out the frozen GEMM's fresh output (y, or dx) and the dropout
// mask where dx's adapter term needs one.
//
// A library runs such a skinny product as a GEMM with inner size R (14 at roberta-base's
// 8/4/2), so it is bound by the pass over out; a mask is then a second pass over a temporary.
// Here each 4 x 64 tile of t b is summed in fp32 registers over the R ranks, masked and scaled,
// added to out's values and rounded once: one read and one write of out, which the frozen GEMM
// has just left in cache. Written with GCC vector types, so a portable build gets AVX-512 or
// AVX2 code through target clones.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>

#include "masking.h"
#include "prefetch.h"

namespace msplora {
namespace fused_expand {

constexpr int kRows = 4;       // rows of a tile: t's values broadcast from registers
constexpr int kVecs = 4;                // 16-float vectors per row of a tile
constexpr int64_t kCols = 16 * kVecs;  // columns of a tile
constexpr int64_t kMaxRank = 512;  // the largest total rank it takes (a block's rows of t stay on the stack)
typedef float vec16 __attribute__((vector_size(64)));

MSPLORA_INLINE vec16 load16(const float* p) {
  vec16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Rows [m0, m0 + n_rows) of out += t b, masked (job.p > 0: from job.bits_in, else hashed), while
// the next_rows after them are prefetched. b32 is b in fp32 with its rows padded with zeros to
// `padded` columns, a multiple of kCols.
template <typename scalar_t>
MSPLORA_INLINE void block(scalar_t* out, const scalar_t* t, int64_t m0, int n_rows, int next_rows, int64_t ranks,
                          const float* b32, int64_t cols, int64_t padded, const masking::MaskJob& job) {
  const int64_t words = (cols + masking::kWordBits - 1) / masking::kWordBits;
  const double scale = job.p > 0 ? 1.0 / (1.0 - job.p) : 1.0;
  float tv[kRows * kMaxRank];
  float acc[kRows * kCols];
  float keep[kCols];
  for (int i = 0; i < kRows; ++i) {
    for (int64_t r = 0; r < ranks; ++r) tv[i * ranks + r] = i < n_rows ? static_cast<float>(t[(m0 + i) * ranks + r]) : 0.0f;
  }
  // The next block's lines of out, a few per tile, so that its read-modify-write finds them in
  // cache (as in expand_bf16.h; its hardware-prefetched version waited on out).
  SpreadPrefetch</*kForWrite=*/true> ahead(out + (m0 + kRows) * cols,
                                          next_rows * cols * static_cast<int64_t>(sizeof(scalar_t)) / 64, padded / kCols);
  for (int64_t n0 = 0; n0 < padded; n0 += kCols) {
    ahead.step();
    // A kRows x kCols tile summed over the ranks in registers.
    vec16 sum[kRows][kVecs] = {};
    for (int64_t r = 0; r < ranks; ++r) {
      vec16 bv[kVecs];
      for (int v = 0; v < kVecs; ++v) bv[v] = load16(b32 + r * padded + n0 + 16 * v);
      for (int i = 0; i < kRows; ++i) {
        const float s = tv[i * ranks + r];
        for (int v = 0; v < kVecs; ++v) sum[i][v] += s * bv[v];
      }
    }
    std::memcpy(acc, sum, sizeof(sum));
    const int64_t len = std::min(kCols, cols - n0);
    for (int i = 0; i < n_rows; ++i) {
      const int64_t m = m0 + i;
      if (job.p > 0.0) {
        if (job.bits_in) {
          masking::unpacked_flags(keep, len, job.bits_in + m * words + n0 / masking::kWordBits);
        } else {
          masking::hashed_flags(keep, len, job.seed, static_cast<uint64_t>(m * cols + n0), static_cast<float>(job.p));
        }
        masking::scale_in_place(acc + i * kCols, keep, len, scale);
      }
      masking::added(out + m * cols + n0, acc + i * kCols, len);
    }
  }
}

template <typename scalar_t>
MSPLORA_INLINE void blocks(scalar_t* out, const scalar_t* t, int64_t rows, int64_t ranks, const float* b32,
                           int64_t cols, int64_t padded, const masking::MaskJob& job, int64_t begin, int64_t end) {
  for (int64_t blk = begin; blk < end; ++blk) {
    const int64_t m0 = blk * kRows;
    // The next block's rows are prefetched only where this thread will compute them.
    const int next_rows = blk + 1 < end ? static_cast<int>(std::min<int64_t>(kRows, rows - m0 - kRows)) : 0;
    block(out, t, m0, static_cast<int>(std::min<int64_t>(kRows, rows - m0)), next_rows, ranks, b32, cols, padded, job);
  }
}

// The vectorized workers: one per dtype with its own fast loops.
MSPLORA_VECTOR_CLONES
inline void blocks_f32(float* out, const float* t, int64_t rows, int64_t ranks, const float* b32, int64_t cols,
                       int64_t padded, const masking::MaskJob& job, int64_t begin, int64_t end) {
  blocks(out, t, rows, ranks, b32, cols, padded, job, begin, end);
}

MSPLORA_VECTOR_CLONES
inline void blocks_bf16(at::BFloat16* out, const at::BFloat16* t, int64_t rows, int64_t ranks, const float* b32,
                        int64_t cols, int64_t padded, const masking::MaskJob& job, int64_t begin, int64_t end) {
  blocks(out, t, rows, ranks, b32, cols, padded, job, begin, end);
}

// out (rows x cols, row-major) += t b, masked as `job` says (p = 0: no mask).
template <typename scalar_t>
void run(scalar_t* out, const scalar_t* t, int64_t rows, int64_t ranks, const float* b32, int64_t cols,
         const masking::MaskJob& job) {
  const int64_t padded = (cols + kCols - 1) / kCols * kCols;
  const int64_t n_blocks = (rows + kRows - 1) / kRows;
  at::parallel_for(0, n_blocks, std::max<int64_t>(1, 256 / std::max<int64_t>(ranks, 1)), [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<scalar_t, float>) blocks_f32(out, t, rows, ranks, b32, cols, padded, job, begin, end);
    else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) blocks_bf16(out, t, rows, ranks, b32, cols, padded, job, begin, end);
    else blocks(out, t, rows, ranks, b32, cols, padded, job, begin, end);
  });
}

}  // namespace fused_expand
}  // namespace msplora
