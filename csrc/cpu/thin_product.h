// Our kernels for the adapter's bf16 products with a thin factor (R <= 16 ranks), on CPUs with
// AVX512-BF16 (vdpbf16ps). First out (M x R) = x (M x K) a (K x R): the shrink x A and dT = dy B^T.
//
// In a training step such a product reads x (or dy) from memory: the frozen GEMMs in between
// stream the caches. There the libraries' GEMMs read x at a fraction of streaming speed (a third
// of x.sum()'s, bench/NOTES.md). rows_of() walks x row by row, two rows at a time, with one fp32
// accumulator per (row, rank) summed along K, and prefetches the rows it will read next, which
// roughly halves that gap. From 12 ranks on, rows_in_lanes() is faster: the ranks in the 16
// lanes of one accumulator per row, 16 rows at a time, no horizontal sums.
//
// dT = dy B^T and dB = T^T dy both read dy. grads() makes one pass over it: each thread takes
// chunks of dy's rows, computes their rows of dT as above (reading them from memory) and then,
// while they are in L2, adds their share of dB: pairs of rows interleaved into vdpbf16ps's pairs,
// one fp32 accumulator per rank and 16 columns. The same kernel runs dB (T^T dy) and dA (x^T dT,
// as (dT^T x)^T) alone: reading its operand from memory by column blocks it never beat ATen, so
// each chunk of rows is first read in row order (which the hardware prefetches) into L2.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include "masking.h"
#include "prefetch.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MSPLORA_THIN_PRODUCT 1
#include <immintrin.h>
#endif

namespace msplora {
namespace thin_product {

constexpr int64_t kMaxRank = 16;      // accumulators: 2 rows x 14 ranks (or 1 x 16) of the 32 zmm registers
constexpr int64_t kKStep = 32;        // bf16 elements of K per vector
constexpr int64_t kPrefetchBytes = 16384;  // how far ahead in x the rows are prefetched

// Rows (or 16-column groups) that share each load: two while their 2R accumulators, with the
// operands, fit the 32 zmm registers.
template <int R>
constexpr int kShared = R <= 14 ? 2 : 1;

// f(std::integral_constant<int, r>{}) for a runtime rank r in 1..kMaxRank: the kernels are
// compiled per rank so that their accumulators stay in registers.
template <typename F, int... Rs>
void with_rank(int64_t r, const F& f, std::integer_sequence<int, Rs...>) {
  ((r == Rs + 1 ? f(std::integral_constant<int, Rs + 1>{}) : void()), ...);
}
template <typename F>
void with_rank(int64_t r, const F& f) {
  with_rank(r, f, std::make_integer_sequence<int, kMaxRank>{});
}

// Whether this CPU (and build) can run the kernels.
inline bool available() {
#ifdef MSPLORA_THIN_PRODUCT
  static const bool yes = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  return yes;
#else
  return false;
#endif
}

// Whether grads(dy, t, b) can run here: bf16, dy's rows contiguous, t (M x R) and b (R x N) thin.
inline bool grads_apply(const at::Tensor& dy, const at::Tensor& t, const at::Tensor& b) {
  return available() && dy.scalar_type() == at::kBFloat16 && t.scalar_type() == at::kBFloat16 &&
         b.scalar_type() == at::kBFloat16 && dy.dim() == 2 && t.dim() == 2 && b.dim() == 2 && dy.stride(1) == 1 &&
         dy.size(1) >= kKStep && dy.size(0) > 0 && t.size(1) >= 1 && t.size(1) <= kMaxRank;
}

constexpr int64_t kChunkBytes = 512 * 1024;  // dy's rows a thread takes at a time: they stay in L2 between the two kernels
constexpr int64_t kPullBytes = 128 * 1024;   // rows read into L2 at a time before the thin-on-the-left kernel

enum class Form { kNone, kThinRight, kThinLeft, kThinRightTransposed };

// Which kernel can run a @ b: x a (a thin, x's rows contiguous), t^T y (t^T thin, y's rows
// contiguous: dB) or x^T t (t thin, x's rows contiguous: dA).
inline Form form(const at::Tensor& a, const at::Tensor& b) {
  if (!available() || a.scalar_type() != at::kBFloat16 || b.scalar_type() != at::kBFloat16 || a.dim() != 2 ||
      b.dim() != 2 || a.numel() == 0 || b.numel() == 0) {
    return Form::kNone;
  }
  const bool thin_b = b.size(1) <= kMaxRank;
  if (thin_b && a.stride(1) == 1 && a.size(1) >= kKStep) return Form::kThinRight;
  if (a.size(0) <= kMaxRank && b.stride(1) == 1 && b.size(1) >= kKStep) return Form::kThinLeft;
  if (thin_b && a.stride(0) == 1 && a.size(0) >= kKStep) return Form::kThinRightTransposed;
  return Form::kNone;
}

// `width` words of one pair of rows, lo and lo + s0 (hi: whether that row exists), from column 0
// with stride s1: word c is lo[c] | hi[c] << 16 up to `cols`, then zeros.
inline void pack_pair_row(const uint16_t* lo, int64_t s0, int64_t s1, bool has_hi, int64_t cols, int64_t width,
                          uint32_t* row) {
  if (s1 == 1 && has_hi) {  // contiguous rows: branch-free, so it vectorizes (ten times the scalar loop)
    const uint16_t* hi = lo + s0;
    for (int64_t c = 0; c < cols; ++c) row[c] = static_cast<uint32_t>(lo[c]) | (static_cast<uint32_t>(hi[c]) << 16);
  } else if (s0 == 1 && has_hi) {  // column-major (a^T, dx's term): a pair is one little-endian word
    for (int64_t c = 0; c < cols; ++c) std::memcpy(row + c, lo + c * s1, sizeof(uint32_t));
  } else {
    for (int64_t c = 0; c < cols; ++c) row[c] = static_cast<uint32_t>(lo[c * s1]) | ((has_hi ? static_cast<uint32_t>(lo[s0 + c * s1]) : 0u) << 16);
  }
  for (int64_t c = cols; c < width; ++c) row[c] = 0u;
}

// A bf16 matrix m (P x Q, any strides) with its rows in the pairs vdpbf16ps takes: a
// (ceil(P / 2) x width) int32 tensor whose word [q][c] is m[2q][c] | m[2q + 1][c] << 16, zero past
// P and Q. The layout of every operand our kernels pair: t's rows (t^T y), a's rows with the ranks
// in 16 lanes (rows_in_lanes).
inline at::Tensor packed_row_pairs(const at::Tensor& m, int64_t width) {
  const int64_t p = m.size(0), half = (p + 1) / 2, s0 = m.stride(0), s1 = m.stride(1);
  at::Tensor out = at::empty({half, width}, m.options().dtype(at::kInt));
  const uint16_t* src = reinterpret_cast<const uint16_t*>(m.data_ptr());
  uint32_t* dst = reinterpret_cast<uint32_t*>(out.data_ptr());
  for (int64_t q = 0; q < half; ++q) {
    pack_pair_row(src + 2 * q * s0, s0, s1, 2 * q + 1 < p, std::min(m.size(1), width), width, dst + q * width);
  }
  return out;
}

// The words pack_column_tiles(m, tile, dst) writes: ceil(P / 2) * ceil(Q / tile) * tile.
inline int64_t column_tiles_words(const at::Tensor& m, int64_t tile) {
  return (m.size(0) + 1) / 2 * ((m.size(1) + tile - 1) / tile) * tile;
}

// The same pairs with the columns in tiles of `tile`, each tile stored whole (b's rows with the
// columns in lanes, expand_bf16.h): word [j][q][c] is column j * tile + c of pair q, zero past P
// and Q; column_tiles_words(m, tile) words at dst. A kernel that walks the columns a tile at
// a time reads one contiguous run per tile, not a line every 4Q bytes, which at large R cost a
// new page for every load.
inline void pack_column_tiles(const at::Tensor& m, int64_t tile, uint32_t* dst) {
  const int64_t p = m.size(0), q_cols = m.size(1), half = (p + 1) / 2, s0 = m.stride(0), s1 = m.stride(1);
  const uint16_t* src = reinterpret_cast<const uint16_t*>(m.data_ptr());
  for (int64_t j = 0; j * tile < q_cols; ++j) {
    for (int64_t q = 0; q < half; ++q) {
      pack_pair_row(src + 2 * q * s0 + j * tile * s1, s0, s1, 2 * q + 1 < p, std::min(tile, q_cols - j * tile), tile,
                    dst + (j * half + q) * tile);
    }
  }
}

#ifdef MSPLORA_THIN_PRODUCT
#define MSPLORA_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// Rows [m0, m1) of out = x a, with at = a^T (R x K, row-major). ROWS rows share each load of at.
template <int R, int ROWS>
MSPLORA_BF16_TARGET void rows_of(const uint16_t* x, int64_t ldx, const uint16_t* at, int64_t k_total, uint16_t* out,
                                 int64_t m0, int64_t m1) {
  const int64_t ahead = std::max<int64_t>(1, kPrefetchBytes / (ldx * 2)) * ldx;  // elements
  for (int64_t m = m0; m < m1; m += ROWS) {
    const int n = static_cast<int>(std::min<int64_t>(ROWS, m1 - m));
    const uint16_t* xr[ROWS];
    for (int i = 0; i < ROWS; ++i) xr[i] = x + (m + std::min(i, n - 1)) * ldx;  // a short last group repeats its row
    __m512 acc[ROWS][R];
    _Pragma("GCC unroll 16") for (int i = 0; i < ROWS; ++i) {
      _Pragma("GCC unroll 16") for (int j = 0; j < R; ++j) acc[i][j] = _mm512_setzero_ps();
    }
    // One loop for the full vectors and the tail, so that the accumulators stay in registers.
    for (int64_t k = 0; k < k_total; k += kKStep) {
      const int64_t left = k_total - k;
      const __mmask32 mask = left >= kKStep ? ~__mmask32{0} : static_cast<__mmask32>((uint32_t{1} << left) - 1);
      __m512bh v[ROWS];
      _Pragma("GCC unroll 16") for (int i = 0; i < ROWS; ++i) {
        v[i] = (__m512bh)_mm512_maskz_loadu_epi16(mask, xr[i] + k);
        _mm_prefetch(reinterpret_cast<const char*>(xr[i] + ahead + k), _MM_HINT_T0);
      }
      _Pragma("GCC unroll 16") for (int j = 0; j < R; ++j) {
        const __m512bh w = (__m512bh)_mm512_maskz_loadu_epi16(mask, at + j * k_total + k);
        _Pragma("GCC unroll 16") for (int i = 0; i < ROWS; ++i) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], v[i], w);
      }
    }
    // Reduced with compile-time indices (a runtime one would keep acc in memory), stored for the n real rows.
    uint16_t sums[ROWS][R];
    _Pragma("GCC unroll 16") for (int i = 0; i < ROWS; ++i) {
      _Pragma("GCC unroll 16") for (int j = 0; j < R; ++j) sums[i][j] = c10::BFloat16(_mm512_reduce_add_ps(acc[i][j])).x;
    }
    std::memcpy(out + m * R, sums, sizeof(uint16_t) * R * n);
  }
}

// Rows [m0, m1) of out (M x R, row-major) = x a, the ranks in the vector lanes: 16 rows at a time,
// each a 16-lane fp32 accumulator that one vdpbf16ps per pair of x's columns advances (the pair
// broadcast from memory, the factor's pair vector shared by the 16 rows). No horizontal sums,
// and one load of the factor per 16 products. ap is packed_row_pairs(a, 16); K odd: the last pair's high
// half is zero.
constexpr int kLaneRows = 16;
// From this rank on the ranks fill enough of the 16 lanes for rows_in_lanes() to match or beat
// rows_of(); below it the idle lanes cost more than the horizontal sums they save (measured at
// ranks 8 to 16, bench/NOTES.md).
constexpr int64_t kLanesMinRank = 12;
MSPLORA_BF16_TARGET inline void rows_in_lanes(const uint16_t* x, int64_t ldx, const uint32_t* ap, int64_t k, int64_t r,
                                              uint16_t* out, int64_t m0, int64_t m1) {
  const int64_t full = k / 2;
  for (int64_t m = m0; m < m1; m += kLaneRows) {
    const int n = static_cast<int>(std::min<int64_t>(kLaneRows, m1 - m));
    const uint16_t* xr[kLaneRows];
    _Pragma("GCC unroll 16") for (int i = 0; i < kLaneRows; ++i) xr[i] = x + (m + std::min(i, n - 1)) * ldx;
    const int64_t next_last = std::min(m + 2 * kLaneRows, m1) - 1;
    __m512 acc[kLaneRows];
    _Pragma("GCC unroll 16") for (int i = 0; i < kLaneRows; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t q = 0; q < full; ++q) {
      // The next 16 rows, one line per pair of columns: row q % 16, line q / 16, a steady stream
      // of requests (a burst of 16 every 16 pairs measured slower cold).
      const int64_t ahead = std::min<int64_t>(m + kLaneRows + (q & 15), next_last);
      _mm_prefetch(reinterpret_cast<const char*>(x + ahead * ldx + (q >> 4) * 32), _MM_HINT_T0);
      const __m512bh w = (__m512bh)_mm512_loadu_si512(ap + 16 * q);
      _Pragma("GCC unroll 16") for (int i = 0; i < kLaneRows; ++i) {
        int32_t pair;
        std::memcpy(&pair, xr[i] + 2 * q, sizeof(pair));
        acc[i] = _mm512_dpbf16_ps(acc[i], w, (__m512bh)_mm512_set1_epi32(pair));
      }
    }
    if (k & 1) {
      const __m512bh w = (__m512bh)_mm512_loadu_si512(ap + 16 * full);
      _Pragma("GCC unroll 16") for (int i = 0; i < kLaneRows; ++i) {
        acc[i] = _mm512_dpbf16_ps(acc[i], w, (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(xr[i][2 * full])));
      }
    }
    // The n rows are one contiguous run of out: each row's 16 lanes are stored whole into a packed
    // buffer (the next row's store overwrites the spare lanes), then copied in one go; a masked
    // store per row was slow.
    uint16_t packed[kLaneRows * 16 + 16];
    _Pragma("GCC unroll 16") for (int i = 0; i < kLaneRows; ++i) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(packed + i * r), (__m256i)_mm512_cvtneps_pbh(acc[i]));
    }
    std::memcpy(out + m * r, packed, sizeof(uint16_t) * r * n);
  }
}

inline void run_in_lanes(const uint16_t* x, int64_t ldx, const uint32_t* ap, int64_t k, int64_t r, uint16_t* out,
                         int64_t m) {
  at::parallel_for(0, (m + kLaneRows - 1) / kLaneRows, 4, [&](int64_t begin, int64_t end) {
    rows_in_lanes(x, ldx, ap, k, r, out, begin * kLaneRows, std::min(m, end * kLaneRows));
  });
}

template <int R>
void run_rank(const uint16_t* x, int64_t ldx, const uint16_t* at, int64_t k, uint16_t* out, int64_t m) {
  constexpr int kRows = kShared<R>;
  at::parallel_for(0, (m + kRows - 1) / kRows, 32, [&](int64_t begin, int64_t end) {
    rows_of<R, kRows>(x, ldx, at, k, out, begin * kRows, std::min(m, end * kRows));
  });
}

// out32 (R x n_pad fp32) += t^T y over pairs [p0, p1) of y's rows (L2-resident), with tp the pairs
// of t's rows (tp[p * R + j] = t[2p][j] | t[2p + 1][j] << 16; zero past M) and y's row 2p + 1 past
// M read from `zeros`. GROUPS blocks of 16 columns share each broadcast of a pair of t. The
// `ahead_lines` cache lines from `ahead` (the next chunk of rows) are prefetched meanwhile, spread
// over the iterations.
template <int R, int GROUPS>
MSPLORA_BF16_TARGET void pair_rows(const uint32_t* tp, const uint16_t* y, int64_t ldy, int64_t m, int64_t n,
                                   const uint16_t* zeros, float* out32, int64_t n_pad, int64_t p0, int64_t p1,
                                   const char* ahead = nullptr, int64_t ahead_lines = 0) {
  constexpr int64_t kCols = 16 * GROUPS;  // n_pad is a multiple of 32: every block is whole
  SpreadPrefetch<> next(ahead, ahead_lines, n_pad / kCols * (p1 - p0));
  for (int64_t c0 = 0; c0 < n_pad; c0 += kCols) {
    __mmask16 mask[GROUPS];
    __m512 acc[GROUPS][R];
    _Pragma("GCC unroll 16") for (int g = 0; g < GROUPS; ++g) {
      const int64_t left = n - (c0 + 16 * g);
      mask[g] = left >= 16 ? static_cast<__mmask16>(0xFFFF) : left > 0 ? static_cast<__mmask16>((1u << left) - 1) : 0;
      _Pragma("GCC unroll 16") for (int j = 0; j < R; ++j) acc[g][j] = _mm512_loadu_ps(out32 + j * n_pad + c0 + 16 * g);
    }
    for (int64_t p = p0; p < p1; ++p) {
      next.step();
      const uint16_t* r0 = y + 2 * p * ldy;
      const uint16_t* r1 = 2 * p + 1 < m ? r0 + ldy : zeros;
      __m512i pair[GROUPS];
      _Pragma("GCC unroll 16") for (int g = 0; g < GROUPS; ++g) {
        const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask[g], r0 + c0 + 16 * g));
        const __m512i hi = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask[g], r1 + c0 + 16 * g));
        pair[g] = _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
      }
      _Pragma("GCC unroll 16") for (int j = 0; j < R; ++j) {
        const __m512i tj = _mm512_set1_epi32(static_cast<int>(tp[p * R + j]));
        _Pragma("GCC unroll 16") for (int g = 0; g < GROUPS; ++g) {
          acc[g][j] = _mm512_dpbf16_ps(acc[g][j], (__m512bh)pair[g], (__m512bh)tj);
        }
      }
    }
    _Pragma("GCC unroll 16") for (int g = 0; g < GROUPS; ++g) {
      _Pragma("GCC unroll 16") for (int j = 0; j < R; ++j) _mm512_storeu_ps(out32 + j * n_pad + c0 + 16 * g, acc[g][j]);
    }
  }
}

// dT rows and the threads' dB partials, a chunk of dy's rows at a time (`rows` even).
template <int R>
void grads_rank(const uint16_t* dy, int64_t ldy, int64_t m, int64_t n, const uint16_t* b, const uint32_t* bp,
                const uint32_t* tp, const uint16_t* zeros, uint16_t* dt, float* buffers, int64_t n_pad, int64_t rows) {
  at::parallel_for(0, (m + rows - 1) / rows, 1, [&](int64_t begin, int64_t end) {
    float* mine = buffers + at::get_thread_num() * R * n_pad;
    for (int64_t c = begin; c < end; ++c) {
      const int64_t r0 = c * rows, r1 = std::min(m, r0 + rows);
      if constexpr (R >= kLanesMinRank) rows_in_lanes(dy, ldy, bp, n, R, dt, r0, r1);
      else rows_of<R, kShared<R>>(dy, ldy, b, n, dt, r0, r1);
      pair_rows<R, kShared<R>>(tp, dy, ldy, m, n, zeros, mine, n_pad, r0 / 2, (r1 + 1) / 2);
    }
  });
}
// Reads rows [r0, r1) of y in row order, so that the hardware prefetcher streams them into the
// caches; returns an OR of what it read so that the loads stay.
MSPLORA_BF16_TARGET inline uint64_t pull(const uint16_t* y, int64_t ldy, int64_t n, int64_t r0, int64_t r1) {
  __m512i seen = _mm512_setzero_si512();
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t c = 0; c + kKStep <= n; c += kKStep) seen = _mm512_or_si512(seen, _mm512_loadu_si512(y + r * ldy + c));
  }
  return static_cast<uint64_t>(_mm512_reduce_or_epi64(seen));
}

// The threads' partials of t^T y, a chunk of y's rows at a time (`rows` even): a thread's first
// chunk pulled, each next one prefetched while the one before is summed (faster cold than pulling
// every chunk first).
template <int R>
void left_rank(const uint16_t* y, int64_t ldy, int64_t m, int64_t n, const uint32_t* tp, const uint16_t* zeros,
               float* buffers, int64_t n_pad, int64_t rows) {
  at::parallel_for(0, (m + rows - 1) / rows, 1, [&](int64_t begin, int64_t end) {
    float* mine = buffers + at::get_thread_num() * R * n_pad;
    volatile uint64_t sink = 0;
    const bool dense = ldy == n;  // the next chunk one run of memory; else every chunk is pulled
    for (int64_t c = begin; c < end; ++c) {
      const int64_t r0 = c * rows, r1 = std::min(m, r0 + rows);
      if (c == begin || !dense) sink = sink | pull(y, ldy, n, r0, r1);
      const int64_t next_bytes = dense && c + 1 < end ? (std::min(m, r1 + rows) - r1) * n * 2 : 0;
      pair_rows<R, kShared<R>>(tp, y, ldy, m, n, zeros, mine, n_pad, r0 / 2, (r1 + 1) / 2,
                               reinterpret_cast<const char*>(y + r1 * ldy), next_bytes / 64);
    }
  });
}
#undef MSPLORA_BF16_TARGET
#endif

// x a, row-major (M x R), where form(x, a) is kThinRight.
inline at::Tensor thin_right(const at::Tensor& x, const at::Tensor& a) {
  TORCH_CHECK(form(x, a) == Form::kThinRight, "msplora: the thin product does not apply to ", x.sizes(), " @ ",
              a.sizes());
  at::Tensor out = at::empty({x.size(0), a.size(1)}, x.options());
#ifdef MSPLORA_THIN_PRODUCT
  if (a.size(1) >= kLanesMinRank) {
    const at::Tensor ap = packed_row_pairs(a, 16);
    run_in_lanes(reinterpret_cast<const uint16_t*>(x.data_ptr()), x.stride(0),
                 reinterpret_cast<const uint32_t*>(ap.data_ptr()), x.size(1), a.size(1),
                 reinterpret_cast<uint16_t*>(out.data_ptr()), x.size(0));
    return out;
  }
  const at::Tensor a_t = a.t().contiguous();
  with_rank(a.size(1), [&](auto rank) {
    run_rank<decltype(rank)::value>(reinterpret_cast<const uint16_t*>(x.data_ptr()), x.stride(0),
                                    reinterpret_cast<const uint16_t*>(a_t.data_ptr()), x.size(1),
                                    reinterpret_cast<uint16_t*>(out.data_ptr()), x.size(0));
  });
#endif
  return out;
}

// What the thin-on-the-left kernel works on for t^T y (t (M x R), y (M x N)): t's rows in pairs as
// vdpbf16ps takes them (row 2p in the low half, 2p + 1 or zero in the high one), one fp32
// (R x n_pad) partial sum per thread, and a zero row for y's missing row 2p + 1. Built and
// totalled with plain loops: as a chain of ATen ops it cost some ten dispatches a call.
struct LeftSums {
  int64_t rank, n_pad, threads;
  at::Tensor pairs, scratch;  // scratch: the partial sums, then the zero row

  LeftSums(const at::Tensor& t, const at::Tensor& y)
      : rank(t.size(1)), n_pad((y.size(1) + 31) / 32 * 32), threads(at::get_num_threads()) {
    pairs = packed_row_pairs(t, rank);
    const int64_t floats = threads * rank * n_pad + n_pad / 2;  // n_pad bf16 zeros take n_pad / 2 floats
    scratch = at::empty({floats}, y.options().dtype(at::kFloat));
    std::memset(scratch.data_ptr(), 0, static_cast<size_t>(floats) * sizeof(float));
  }
  const uint32_t* tp() const { return reinterpret_cast<const uint32_t*>(pairs.data_ptr()); }
  float* partials() const { return scratch.data_ptr<float>(); }
  const uint16_t* zero_row() const { return reinterpret_cast<const uint16_t*>(partials() + threads * rank * n_pad); }
  // The threads' partials summed and rounded to bf16: (R x N) row-major, or its transpose
  // (N x R) row-major (dA, without a strided copy afterwards).
  at::Tensor total(const at::Tensor& y, bool transposed = false) const {
    const int64_t n = y.size(1);
    at::Tensor out = at::empty(transposed ? at::IntArrayRef{n, rank} : at::IntArrayRef{rank, n}, y.options());
    uint16_t* o = reinterpret_cast<uint16_t*>(out.data_ptr());
    float* sum = partials();  // thread 0's partial, the others added into it
    const int64_t size = rank * n_pad;
    for (int64_t th = 1; th < threads; ++th) {
      const float* mine = sum + th * size;
      for (int64_t i = 0; i < size; ++i) sum[i] += mine[i];
    }
    const int64_t col_step = transposed ? rank : 1, rank_step = transposed ? 1 : n;
    for (int64_t j = 0; j < rank; ++j) {
      for (int64_t c = 0; c < n; ++c) o[j * rank_step + c * col_step] = masking::bf16_bits(sum[j * n_pad + c]);
    }
    return out;
  }
};

// t^T y, row-major (R x N), or y^T t (N x R) row-major when `transposed`: t (M x R), y (M x N)
// with contiguous rows.
inline at::Tensor thin_left(const at::Tensor& t, const at::Tensor& y, bool transposed = false) {
  const LeftSums sums(t, y);
#ifdef MSPLORA_THIN_PRODUCT
  const int64_t rows = std::max<int64_t>(2, kPullBytes / (y.size(1) * 2)) / 2 * 2;
  with_rank(t.size(1), [&](auto rank) {
    left_rank<decltype(rank)::value>(reinterpret_cast<const uint16_t*>(y.data_ptr()), y.stride(0), y.size(0),
                                     y.size(1), sums.tp(), sums.zero_row(), sums.partials(), sums.n_pad, rows);
  });
#endif
  return sums.total(y, transposed);
}

// a @ b by the kernel form(a, b) names, row-major.
inline at::Tensor run(const at::Tensor& a, const at::Tensor& b) {
  switch (form(a, b)) {
    case Form::kThinRight: return thin_right(a, b);
    case Form::kThinLeft: return thin_left(a.t(), b);
    case Form::kThinRightTransposed: return thin_left(b, a.t(), /*transposed=*/true);
    default: TORCH_CHECK(false, "msplora: no thin kernel takes ", a.sizes(), " @ ", b.sizes());
  }
}

// (dT, dB) = (dy b^T, t^T dy) in one pass over dy, where grads_apply(dy, t, b); row-major.
inline std::tuple<at::Tensor, at::Tensor> grads(const at::Tensor& dy, const at::Tensor& t, const at::Tensor& b) {
  TORCH_CHECK(grads_apply(dy, t, b), "msplora: the one-pass thin gradients do not apply to dy ", dy.sizes(), ", T ",
              t.sizes(), ", B ", b.sizes());
  at::Tensor dt = at::empty({dy.size(0), t.size(1)}, dy.options());
  const LeftSums sums(t, dy);
#ifdef MSPLORA_THIN_PRODUCT
  const at::Tensor bc = b.contiguous();
  const at::Tensor bp = b.size(0) >= kLanesMinRank ? packed_row_pairs(b.t(), 16) : at::Tensor();
  const int64_t rows = std::max<int64_t>(2, kChunkBytes / (dy.size(1) * 2)) / 2 * 2;
  with_rank(t.size(1), [&](auto rank) {
    grads_rank<decltype(rank)::value>(reinterpret_cast<const uint16_t*>(dy.data_ptr()), dy.stride(0), dy.size(0),
                                      dy.size(1), reinterpret_cast<const uint16_t*>(bc.data_ptr()),
                                      bp.defined() ? reinterpret_cast<const uint32_t*>(bp.data_ptr()) : nullptr, sums.tp(),
                                      sums.zero_row(), reinterpret_cast<uint16_t*>(dt.data_ptr()), sums.partials(),
                                      sums.n_pad, rows);
  });
#endif
  return {dt, sums.total(dy)};
}

}  // namespace thin_product
}  // namespace msplora
