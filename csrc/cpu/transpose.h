// A row-major copy of a column-major 16-bit matrix, for the transposed GEMM candidates' results
// (gemms.h, product). ATen's copy of a transposed bf16 tensor runs far below memory speed, and
// cost more than the transposed product saves; here blocks of
// 8 rows x 32 columns go through three rounds of unpacks into eight 16-byte columns each.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MSPLORA_TRANSPOSE_AVX512 1
#endif

namespace msplora {
namespace transpose {

constexpr int64_t kRows = 8, kCols = 32;

inline bool available() {
#ifdef MSPLORA_TRANSPOSE_AVX512
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  return ok;
#else
  return false;
#endif
}

#ifdef MSPLORA_TRANSPOSE_AVX512
// dst[c * ldd + r] = src[r * lds + c] for an 8 x 32 block.
__attribute__((target("avx512f,avx512bw"))) inline void block(const uint16_t* src, int64_t lds, uint16_t* dst,
                                                              int64_t ldd) {
  __m512i v[kRows], a[4], b[4], c[8], col[8];
  for (int i = 0; i < kRows; ++i) v[i] = _mm512_loadu_si512(src + i * lds);
  // Within each 128-bit lane (columns 8L..8L+7): a[j] holds columns 0-3 of rows 2j and 2j + 1 as
  // 32-bit pairs, b[j] columns 4-7.
  for (int j = 0; j < 4; ++j) {
    a[j] = _mm512_unpacklo_epi16(v[2 * j], v[2 * j + 1]);
    b[j] = _mm512_unpackhi_epi16(v[2 * j], v[2 * j + 1]);
  }
  // 64-bit quads of four rows: c[0] columns 0, 1 of rows 0-3, c[1] columns 2, 3, c[2] and c[3]
  // the same for rows 4-7; c[4..7] columns 4-7.
  c[0] = _mm512_unpacklo_epi32(a[0], a[1]), c[1] = _mm512_unpackhi_epi32(a[0], a[1]);
  c[2] = _mm512_unpacklo_epi32(a[2], a[3]), c[3] = _mm512_unpackhi_epi32(a[2], a[3]);
  c[4] = _mm512_unpacklo_epi32(b[0], b[1]), c[5] = _mm512_unpackhi_epi32(b[0], b[1]);
  c[6] = _mm512_unpacklo_epi32(b[2], b[3]), c[7] = _mm512_unpackhi_epi32(b[2], b[3]);
  // col[k]: lane L holds column 8L + k, all 8 rows.
  for (int h = 0; h < 2; ++h) {
    col[4 * h + 0] = _mm512_unpacklo_epi64(c[4 * h + 0], c[4 * h + 2]);
    col[4 * h + 1] = _mm512_unpackhi_epi64(c[4 * h + 0], c[4 * h + 2]);
    col[4 * h + 2] = _mm512_unpacklo_epi64(c[4 * h + 1], c[4 * h + 3]);
    col[4 * h + 3] = _mm512_unpackhi_epi64(c[4 * h + 1], c[4 * h + 3]);
  }
  for (int k = 0; k < 8; ++k) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + k * ldd), _mm512_castsi512_si128(col[k]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (8 + k) * ldd), _mm512_extracti32x4_epi32(col[k], 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (16 + k) * ldd), _mm512_extracti32x4_epi32(col[k], 2));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (24 + k) * ldd), _mm512_extracti32x4_epi32(col[k], 3));
  }
}

// dst (cols x rows, row-major) = src^T, src (rows x cols) with row stride lds: 8 x 32 blocks, the
// ragged edges element by element. The threads take columns, so each writes its own rows of dst.
inline void run(const uint16_t* src, int64_t rows, int64_t cols, int64_t lds, uint16_t* dst) {
  const int64_t full_rows = rows / kRows * kRows;
  at::parallel_for(0, (cols + kCols - 1) / kCols, 8, [&](int64_t begin, int64_t end) {
    for (int64_t cb = begin; cb < end; ++cb) {
      const int64_t c0 = cb * kCols, c1 = std::min(cols, c0 + kCols);
      if (c1 - c0 == kCols) {
        for (int64_t r = 0; r < full_rows; r += kRows) block(src + r * lds + c0, lds, dst + c0 * rows + r, rows);
      }
      const int64_t scalar_from = c1 - c0 == kCols ? full_rows : 0;
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t r = scalar_from; r < rows; ++r) dst[c * rows + r] = src[r * lds + c];
      }
    }
  });
}
#endif

// t as a row-major tensor: for a column-major 16-bit matrix (a transposed candidate's product)
// our copy, for anything else t.contiguous().
inline at::Tensor row_major(const at::Tensor& t) {
#ifdef MSPLORA_TRANSPOSE_AVX512
  if (t.dim() == 2 && t.element_size() == 2 && t.size(0) > 1 && t.size(1) > 1 && t.stride(0) == 1 &&
      t.stride(1) >= t.size(0) && available()) {
    at::Tensor out = at::empty(t.sizes(), t.options());
    // t[i][j] sits at j * stride(1) + i: the rows of its transpose, (N x M) with row stride stride(1).
    run(reinterpret_cast<const uint16_t*>(t.data_ptr()), t.size(1), t.size(0), t.stride(1),
        reinterpret_cast<uint16_t*>(out.data_ptr()));
    return out;
  }
#endif
  return t.contiguous();
}

}  // namespace transpose
}  // namespace msplora
