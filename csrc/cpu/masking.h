// The CPU op's dropout: draw the mask (dropout_hash.h), apply it, pack it into bits and apply
// packed bits, a row at a time and at vector speed.
//
// The inner loops are branch-free so that they vectorize, and always inlined into a worker that
// GCC clones for AVX-512 and AVX2 and picks at load time, so a portable build still runs them at
// vector speed (several times the scalar loop's, bench/NOTES.md) and nothing calls through the
// clones' dispatch per small block. bf16 has its own loops with the
// rounding written out, because c10::BFloat16's conversions do not vectorize.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "../dropout_hash.h"

namespace msplora {
namespace masking {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MSPLORA_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MSPLORA_VECTOR_CLONES
#endif
#define MSPLORA_INLINE inline __attribute__((always_inline))

// Columns per block: a multiple of the mask word, small enough for the flags to stay in L1.
constexpr int64_t kBlock = 2048;
constexpr int64_t kWordBits = 32;  // contract.MASK_WORD_BITS

// The keep flags (1 kept, 0 dropped) of elements first..first+n-1 of the logical input.
MSPLORA_INLINE void hashed_flags(float* keep, int64_t n, uint64_t seed, uint64_t first, float p) {
  for (int64_t i = 0; i < n; ++i) keep[i] = uniform01(seed, first + static_cast<uint64_t>(i)) >= p ? 1.0f : 0.0f;
}

// The flags of n columns from packed words (bit k % 32 of word k / 32).
MSPLORA_INLINE void unpacked_flags(float* keep, int64_t n, const int32_t* words) {
  const int64_t full = n / kWordBits;
  for (int64_t w = 0; w < full; ++w) {  // a whole word: a fixed-length loop of shifts, which vectorizes
    const uint32_t word = static_cast<uint32_t>(words[w]);
    for (int j = 0; j < kWordBits; ++j) keep[w * kWordBits + j] = static_cast<float>((word >> j) & 1u);
  }
  for (int64_t i = full * kWordBits; i < n; ++i) keep[i] = static_cast<float>((static_cast<uint32_t>(words[full]) >> (i - full * kWordBits)) & 1u);
}

// Packs n flags into ceil(n / 32) words; bits past n are 0. A whole word is a fixed-length
// OR-reduction, which vectorizes; only a ragged last word takes the short loop.
MSPLORA_INLINE void pack_flags(int32_t* words, int64_t n, const float* keep) {
  const int64_t full = n / kWordBits;
  for (int64_t w = 0; w < full; ++w) {
    uint32_t word = 0;
    for (int i = 0; i < kWordBits; ++i) word |= static_cast<uint32_t>(keep[w * kWordBits + i] != 0.0f) << i;
    words[w] = static_cast<int32_t>(word);
  }
  if (full * kWordBits < n) {
    uint32_t word = 0;
    for (int64_t i = 0; full * kWordBits + i < n; ++i) word |= static_cast<uint32_t>(keep[full * kWordBits + i] != 0.0f) << i;
    words[full] = static_cast<int32_t>(word);
  }
}

// bf16 bits of v, rounded to nearest even as c10::BFloat16 rounds (NaN stays NaN).
MSPLORA_INLINE uint16_t bf16_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
}

MSPLORA_INLINE float bf16_value(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

MSPLORA_INLINE float as_float(float v) { return v; }
MSPLORA_INLINE float as_float(at::BFloat16 v) { return bf16_value(v.x); }

// out = in * keep * scale (in and out of one dtype), multiplied in fp32 (fp64 for fp64) and
// rounded once.
template <typename scalar_t>
MSPLORA_INLINE void scaled(scalar_t* out, const scalar_t* in, const float* keep, int64_t n, double scale) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    const float s = static_cast<float>(scale);
    for (int64_t i = 0; i < n; ++i) out[i] = as_float(in[i]) * (keep[i] * s);
  } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    const float s = static_cast<float>(scale);
    uint16_t* o = reinterpret_cast<uint16_t*>(out);
    for (int64_t i = 0; i < n; ++i) o[i] = bf16_bits(as_float(in[i]) * (keep[i] * s));
  } else {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t s = static_cast<acc_t>(scale);
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(static_cast<acc_t>(in[i]) * (static_cast<acc_t>(keep[i]) * s));
  }
}

// acc = acc * keep * scale, in fp32: a kernel's accumulators masked before they are added to out.
MSPLORA_INLINE void scale_in_place(float* acc, const float* keep, int64_t n, double scale) {
  const float s = static_cast<float>(scale);
  for (int64_t i = 0; i < n; ++i) acc[i] *= keep[i] * s;
}

// out = out + in, added in fp32 and rounded once to out's dtype.
template <typename scalar_t>
MSPLORA_INLINE void added(scalar_t* out, const float* in, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    uint16_t* o = reinterpret_cast<uint16_t*>(out);
    for (int64_t i = 0; i < n; ++i) o[i] = bf16_bits(bf16_value(o[i]) + in[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(static_cast<float>(out[i]) + in[i]);
  }
}

// Where a row's mask comes from, and where it goes.
struct MaskJob {
  double p = 0.0;
  uint64_t seed = 0;
  const int32_t* bits_in = nullptr;  // take the mask from these (M, ceil(K / 32)) words instead of the hash
  int32_t* bits_out = nullptr;       // and/or pack it here
};

// Rows [begin, end) of an (rows x cols) input: out = in * mask (in and out may alias, or both be
// null to only pack the mask).
template <typename scalar_t>
MSPLORA_INLINE void mask_rows(const MaskJob& job, const scalar_t* in, scalar_t* out, int64_t cols, int64_t begin, int64_t end) {
  const int64_t words = (cols + kWordBits - 1) / kWordBits;
  const double scale = 1.0 / (1.0 - job.p);
  float keep[kBlock];
  for (int64_t r = begin; r < end; ++r) {
    for (int64_t c0 = 0; c0 < cols; c0 += kBlock) {
      const int64_t len = std::min(kBlock, cols - c0);
      if (job.bits_in) unpacked_flags(keep, len, job.bits_in + r * words + c0 / kWordBits);
      else hashed_flags(keep, len, job.seed, static_cast<uint64_t>(r * cols + c0), static_cast<float>(job.p));
      if (job.bits_out) pack_flags(job.bits_out + r * words + c0 / kWordBits, len, keep);
      if (out) scaled(out + r * cols + c0, in + r * cols + c0, keep, len, scale);
    }
  }
}

// The workers: vectorized clones for the dtypes with their own fast loops, the plain loop for the
// others (overloads, picked by the pointer types).
MSPLORA_VECTOR_CLONES
inline void masked_rows(const MaskJob& job, const float* in, float* out, int64_t cols, int64_t begin, int64_t end) {
  mask_rows(job, in, out, cols, begin, end);
}

MSPLORA_VECTOR_CLONES
inline void masked_rows(const MaskJob& job, const at::BFloat16* in, at::BFloat16* out, int64_t cols, int64_t begin,
                        int64_t end) {
  mask_rows(job, in, out, cols, begin, end);
}

template <typename scalar_t>
void masked_rows(const MaskJob& job, const scalar_t* in, scalar_t* out, int64_t cols, int64_t begin, int64_t end) {
  mask_rows(job, in, out, cols, begin, end);
}

// Runs a job over the rows of an (rows x cols) tensor in parallel: out = src * mask (src may be
// undefined, to only pack the mask).
inline void run(const MaskJob& job, const at::Tensor& src, at::Tensor& out, int64_t rows, int64_t cols) {
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(cols, 1));
  const at::ScalarType dtype = src.defined() ? src.scalar_type() : at::kFloat;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "msplora_mask", [&] {
    const scalar_t* in = src.defined() ? src.data_ptr<scalar_t>() : nullptr;
    scalar_t* o = src.defined() ? out.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      masked_rows(job, in, o, cols, begin, end);
    });
  });
}

}  // namespace masking
}  // namespace msplora
