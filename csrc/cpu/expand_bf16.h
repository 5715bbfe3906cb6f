// Our bf16 kernel for the adapter's products that add into a whole (M, N) tensor, out += mask *
// (t b) (the expand into y, dx's masked dT A^T), on CPUs with AVX512-BF16 (vdpbf16ps).
//
// fused_expand.h sums each tile in fp32 FMAs, one rank at a time; here vdpbf16ps takes two ranks
// at once: b's rows in pairs (rank 2q in the low half of each 32-bit lane, 2q + 1 in the high
// one), and t's pair for the row broadcast. Each 8 x 32 tile of the product is summed over the R / 2
// pairs in registers, masked and scaled in fp32, added to out's values and rounded once: one read
// and one write of out, which the frozen GEMM has just left in cache.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "masking.h"
#include "prefetch.h"
#include "thin_product.h"

namespace msplora {
namespace expand_bf16 {

// t's pairs for a tile's rows stay on the stack (2 KB). 128 takes llama2-7b's 64/32/16, where dx's
// masked term in one pass still beats the library's product, a mask pass and an add.
constexpr int64_t kMaxRank = 128;
constexpr int kRows = 8;          // rows of a tile: they share each load of b's pairs
constexpr int64_t kCols = 32;     // columns of a tile: one mask word

// Whether run(out, t, b, ...) can run here: bf16, rows contiguous, R <= kMaxRank.
inline bool applies(const at::Tensor& out, const at::Tensor& t, const at::Tensor& b) {
  return thin_product::available() && out.scalar_type() == at::kBFloat16 && t.scalar_type() == at::kBFloat16 &&
         b.scalar_type() == at::kBFloat16 && out.is_contiguous() && t.size(1) >= 1 && t.size(1) <= kMaxRank &&
         out.numel() > 0;
}

#ifdef MSPLORA_THIN_PRODUCT
// Rows [m0, m1) of out (M x N) += mask * (t b); t (M x R) row-major, bp =
// thin_product::pack_column_tiles(b, kCols): b's pairs of ranks, the columns in the lanes, a tile's
// kCols columns of every pair in one contiguous run (tile j starts at word j * kCols * pairs). Compiled
// apart for MASKED (job.p > 0) and not, so that the unmasked expand carries none of the mask's
// code (a little faster in interleaved runs).
template <bool MASKED>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void rows(
    uint16_t* out, const uint16_t* t, int64_t r, const uint32_t* bp, int64_t n, const masking::MaskJob& job,
    int64_t m0, int64_t m1) {
  const int64_t pairs = (r + 1) / 2, words = (n + masking::kWordBits - 1) / masking::kWordBits;
  constexpr bool masked = MASKED;
  const __m512 scale = _mm512_set1_ps(masked ? static_cast<float>(1.0 / (1.0 - job.p)) : 1.0f);
  uint32_t tp[kRows][(kMaxRank + 1) / 2];
  alignas(64) float keep[kCols];
  const int64_t tiles = (n + kCols - 1) / kCols;
  for (int64_t m = m0; m < m1; m += kRows) {
    const int here = static_cast<int>(std::min<int64_t>(kRows, m1 - m));
    for (int i = 0; i < kRows; ++i) {  // a short last tile repeats its last row
      const uint16_t* row = t + (m + std::min(i, here - 1)) * r;
      for (int64_t q = 0; q < pairs; ++q) {
        const uint32_t hi = 2 * q + 1 < r ? row[2 * q + 1] : 0u;
        tp[i][q] = static_cast<uint32_t>(row[2 * q]) | (hi << 16);
      }
    }
    // The next tile row's lines of out, a few per tile: left to the hardware prefetcher the kernel
    // waited on out (prefetched, it runs about a third faster hot and a fifth faster cold).
    const int64_t next_rows = std::max<int64_t>(0, std::min<int64_t>(kRows, m1 - m - kRows));
    SpreadPrefetch<> ahead(out + (m + kRows) * n, next_rows * n * 2 / 64, tiles);
    for (int64_t c0 = 0; c0 < n; c0 += kCols) {
      ahead.step();
      const uint32_t* tile = bp + c0 * pairs;  // (c0 / kCols) * pairs * kCols
      __m512 acc[kRows][2];
      _Pragma("GCC unroll 8") for (int i = 0; i < kRows; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
      for (int64_t q = 0; q < pairs; ++q) {
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(tile + q * kCols);
        const __m512bh w1 = (__m512bh)_mm512_loadu_si512(tile + q * kCols + 16);
        _Pragma("GCC unroll 8") for (int i = 0; i < kRows; ++i) {
          const __m512bh tv = (__m512bh)_mm512_set1_epi32(static_cast<int>(tp[i][q]));
          acc[i][0] = _mm512_dpbf16_ps(acc[i][0], w0, tv);
          acc[i][1] = _mm512_dpbf16_ps(acc[i][1], w1, tv);
        }
      }
      const int64_t len = std::min(kCols, n - c0);
      // Compile-time indices into acc (a runtime one would keep it in memory, the q loop too).
      _Pragma("GCC unroll 8") for (int i = 0; i < kRows; ++i) {
        if (i >= here) break;
        const int64_t row = m + i;
        if constexpr (masked) {
          if (job.bits_in) masking::unpacked_flags(keep, len, job.bits_in + row * words + c0 / masking::kWordBits);
          else masking::hashed_flags(keep, len, job.seed, static_cast<uint64_t>(row * n + c0), static_cast<float>(job.p));
        }
        _Pragma("GCC unroll 2") for (int h = 0; h < 2; ++h) {
          const int64_t left = len - 16 * h;
          if (left <= 0) break;
          __m512 term = acc[i][h];
          if constexpr (masked) term = _mm512_mul_ps(_mm512_mul_ps(term, _mm512_loadu_ps(keep + 16 * h)), scale);
          uint16_t* o = out + row * n + c0 + 16 * h;
          // Masked only at a ragged end: masked stores are several times slower on some CPUs.
          if (left >= 16) {
            const __m512 old = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)o)), 16));
            _mm256_storeu_si256((__m256i*)o, (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(old, term)));
          } else {
            const __mmask16 lanes = static_cast<__mmask16>((1u << left) - 1);
            const __m512 old = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, o)), 16));
            _mm256_mask_storeu_epi16(o, lanes, (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(old, term)));
          }
        }
      }
    }
  }
}
#endif

// out (M x N, row-major) += t b, masked as `job` says (p = 0: no mask), where applies(out, t, b).
inline void run(at::Tensor& out, const at::Tensor& t, const at::Tensor& b, const masking::MaskJob& job) {
  TORCH_CHECK(applies(out, t, b), "msplora: the bf16 expand does not apply to out ", out.sizes(), ", T ", t.sizes(),
              ", B ", b.sizes());
#ifdef MSPLORA_THIN_PRODUCT
  const int64_t n = out.size(1);
  // Packed into a buffer this thread keeps: a fresh one (917 KB at llama2-7b) would be faulted in
  // page by page once the heap is trimmed, as it is in a training step (gemms.h, ColdCaches).
  static thread_local std::vector<uint32_t> packed;
  packed.resize(std::max<size_t>(packed.size(), thin_product::column_tiles_words(b, kCols)));
  thin_product::pack_column_tiles(b, kCols, packed.data());
  const at::Tensor tc = t.contiguous();
  const auto* tv = reinterpret_cast<const uint16_t*>(tc.data_ptr());
  auto* o = reinterpret_cast<uint16_t*>(out.data_ptr());
  const uint32_t* bpv = packed.data();
  at::parallel_for(0, (out.size(0) + kRows - 1) / kRows, 16, [&](int64_t begin, int64_t end) {
    if (job.p > 0.0) rows<true>(o, tv, t.size(1), bpv, n, job, begin * kRows, std::min(out.size(0), end * kRows));
    else rows<false>(o, tv, t.size(1), bpv, n, job, begin * kRows, std::min(out.size(0), end * kRows));
  });
#endif
}

}  // namespace expand_bf16
}  // namespace msplora
