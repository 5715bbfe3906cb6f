// Our kernel for a bf16 product with a thin right factor: out (M x R) = x (M x K) a (K x R), R <= 16,
// on CPUs with AVX512-BF16 (vdpbf16ps). The shrink (x A) and dT = dy B^T have this form.
//
// In a training step such a product reads x (or dy) from memory: the frozen GEMMs in between
// stream the caches. There the libraries' GEMMs run at 10-15 GB/s of x, far below streaming
// (AMD EPYC, bf16 4096 x 768 x 14: 630-880 us cold against 230-260 us for x.sum();
// bench/NOTES.md, twelfth session). This kernel walks x row by row, two rows at a time, with one
// fp32 accumulator per (row, rank) summed along K, and prefetches the rows it will read next;
// cold it takes 340-430 us there.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MSPLORA_THIN_PRODUCT 1
#include <immintrin.h>
#endif

namespace msplora {
namespace thin_product {

constexpr int64_t kMaxRank = 16;      // accumulators: 2 rows x 14 ranks (or 1 x 16) of the 32 zmm registers
constexpr int64_t kKStep = 32;        // bf16 elements of K per vector
constexpr int64_t kPrefetchBytes = 16384;  // how far ahead in x the rows are prefetched

// Whether this CPU (and build) can run the kernel.
inline bool available() {
#ifdef MSPLORA_THIN_PRODUCT
  static const bool yes = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
  return yes;
#else
  return false;
#endif
}

// Whether a @ b can run here: bf16, a thin b, a's rows contiguous.
inline bool applies(const at::Tensor& a, const at::Tensor& b) {
  return available() && a.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16 && a.dim() == 2 &&
         b.dim() == 2 && b.size(1) >= 1 && b.size(1) <= kMaxRank && a.size(1) >= kKStep && a.stride(1) == 1;
}

#ifdef MSPLORA_THIN_PRODUCT
#define MSPLORA_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))

// Rows [m0, m1) of out = x a, with at = a^T (R x K, row-major). ROWS rows share each load of at.
template <int R, int ROWS>
MSPLORA_BF16_TARGET void rows(const uint16_t* x, int64_t ldx, const uint16_t* at, int64_t k_total, uint16_t* out,
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

template <int R>
void run_rank(const uint16_t* x, int64_t ldx, const uint16_t* at, int64_t k, uint16_t* out, int64_t m) {
  constexpr int kRows = R <= 14 ? 2 : 1;
  at::parallel_for(0, (m + kRows - 1) / kRows, 32, [&](int64_t begin, int64_t end) {
    rows<R, kRows>(x, ldx, at, k, out, begin * kRows, std::min(m, end * kRows));
  });
}

template <int... Rs>
void dispatch(int64_t r, std::integer_sequence<int, Rs...>, const uint16_t* x, int64_t ldx, const uint16_t* at,
              int64_t k, uint16_t* out, int64_t m) {
  ((r == Rs + 1 ? run_rank<Rs + 1>(x, ldx, at, k, out, m) : void()), ...);
}
#undef MSPLORA_BF16_TARGET
#endif

// a @ b (row-major M x R) where applies(a, b).
inline at::Tensor run(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(applies(a, b), "msplora: the thin product does not apply to ", a.sizes(), " @ ", b.sizes());
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
#ifdef MSPLORA_THIN_PRODUCT
  const at::Tensor bt = b.t().contiguous();
  dispatch(b.size(1), std::make_integer_sequence<int, kMaxRank>{}, reinterpret_cast<const uint16_t*>(a.data_ptr()),
           a.stride(0), reinterpret_cast<const uint16_t*>(bt.data_ptr()), a.size(1),
           reinterpret_cast<uint16_t*>(out.data_ptr()), a.size(0));
#endif
  return out;
}

}  // namespace thin_product
}  // namespace msplora
