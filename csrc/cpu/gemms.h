// The CPU op's GEMMs, and which library runs each one, chosen by measurement.
//
// Two libraries can run a GEMM here: ATen's at::mm/addmm (MKL for fp32 on x86, oneDNN for bf16
// where the CPU has AVX512-BF16) and oneDNN through mkldnn::_linear_pointwise, the op inductor
// emits for CPU linears, on plain tensors. Which is faster depends on the CPU, the dtype and the
// shape: on some CPUs oneDNN runs fp32 GEMMs twice as fast as MKL, frozen and skinny alike, while
// on others MKL wins (bench/NOTES.md). So with the cpu_gemm setting at "auto" (the
// default), the first call of each shape class times every candidate (library and, for the
// skinny products, orientation) and keeps the fastest for the rest of the process. The setting
// can instead name one library (orientation still measured) or one fixed candidate, which is how
// the tests reach every path on any CPU. Every choice made is listed by gemm_choices().
// The adapter's products also have our kernels as candidates: the ones added into a whole (M, N)
// tensor (expand_bf16.h in bf16 on CPUs with AVX512-BF16, else fused_expand.h) and, in bf16 on such
// CPUs, the thin ones, with dT and dB also as one pass over dy (thin_product.h); cpu_gemm=fused
// runs ours wherever one applies and ATen elsewhere.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <unistd.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif
#include <vector>

#include "../settings.h"
#include "choice_store.h"
#include "thin_product.h"
#include "transpose.h"

namespace msplora {

inline const std::optional<c10::OperatorHandle>& onednn_linear_op() {
  static const std::optional<c10::OperatorHandle> op =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  return op;
}

// x w^T (+ bias) on oneDNN. Called boxed: the op's C++ signature types differ between torch versions.
inline at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  torch::jit::Stack stack;
  stack.reserve(6);
  stack.emplace_back(x);
  stack.emplace_back(w);
  stack.emplace_back(bias.has_value() && bias->defined() ? c10::IValue(*bias) : c10::IValue());
  stack.emplace_back(std::string("none"));
  stack.emplace_back(c10::List<std::optional<at::Scalar>>());
  stack.emplace_back(c10::IValue());
  onednn_linear_op()->callBoxed(&stack);
  return stack.back().toTensor();
}

// One way to compute a GEMM: a library, and for a product, whether it computes the transpose;
// or one of our kernels: for a product added into a whole (M, N) tensor the fused one
// (expand_bf16.h or fused_expand.h), for a bf16 product with a thin factor the thin one
// (thin_product.h).
struct Candidate {
  bool onednn;
  bool transposed;
  bool fused = false;
  bool thin = false;
  bool separate = false;  // for a pass that computes two products: each on its own choice
  const char* name() const {
    if (separate) return "separate";
    if (fused) return "fused";
    if (thin) return "thin";
    return onednn ? (transposed ? "onednn:transposed" : "onednn:plain") : (transposed ? "aten:transposed" : "aten:plain");
  }
};

inline bool onednn_available(at::ScalarType dtype) {
  // oneDNN's linear takes fp32 and bf16 here; fp64 and fp16 stay on ATen.
  return (dtype == at::kFloat || dtype == at::kBFloat16) && onednn_linear_op().has_value();
}

inline bool mode_is_onednn(CpuGemm mode) {
  return mode == CpuGemm::kOneDnn || mode == CpuGemm::kOneDnnPlain || mode == CpuGemm::kOneDnnTransposed;
}

// Whether the cpu_gemm setting allows candidate c.
inline bool allowed(CpuGemm mode, const Candidate& c) {
  if (c.separate) return mode != CpuGemm::kFused;
  if (c.fused || c.thin) return mode == CpuGemm::kAuto || mode == CpuGemm::kFused;
  switch (mode) {
    case CpuGemm::kAuto: return true;
    case CpuGemm::kFused: return false;
    case CpuGemm::kAten: return !c.onednn;
    case CpuGemm::kOneDnn: return c.onednn;
    case CpuGemm::kAtenPlain: return !c.onednn && !c.transposed;
    case CpuGemm::kAtenTransposed: return !c.onednn && c.transposed;
    case CpuGemm::kOneDnnPlain: return c.onednn && !c.transposed;
    case CpuGemm::kOneDnnTransposed: return c.onednn && c.transposed;
  }
  return true;
}

// The candidates for a GEMM of this dtype that the setting allows (only plain ones where
// `transposable` is false: an output that must stay row-major without a copy). Where the setting
// names one this GEMM cannot take (a transposed one, or oneDNN for fp64), the plain form of the
// library it names runs, or ATen's.
inline std::vector<Candidate> allowed_candidates(at::ScalarType dtype, bool transposable, bool fusable = false,
                                                 bool thin = false) {
  const CpuGemm mode = cpu_gemm();
  std::vector<Candidate> out;
  if (fusable && allowed(mode, Candidate{false, false, true})) out.push_back(Candidate{false, false, true});
  if (thin && allowed(mode, Candidate{false, false, false, true})) out.push_back(Candidate{false, false, false, true});
  for (bool onednn : {false, true}) {
    for (bool transposed : {false, true}) {
      const Candidate c{onednn, transposed};
      if ((!onednn || onednn_available(dtype)) && (!transposed || transposable) && allowed(mode, c)) out.push_back(c);
    }
  }
  if (out.empty()) out.push_back(Candidate{mode_is_onednn(mode) && onednn_available(dtype), false});
  return out;
}

// The shape class of a GEMM: each size rounded up to a power of two, so that a new token count
// in the same class reuses the choice.
inline int64_t size_class(int64_t n) {
  int64_t c = 1;
  while (c < n) c <<= 1;
  return c;
}

struct ChoiceKey {
  std::string gemm;
  at::ScalarType dtype;
  int mode;
  int64_t m, k, n;
  bool operator<(const ChoiceKey& o) const {
    return std::tie(gemm, dtype, mode, m, k, n) < std::tie(o.gemm, o.dtype, o.mode, o.m, o.k, o.n);
  }
};

struct Choice {
  Candidate candidate;
  std::string timings;  // what was measured, for gemm_choices()
};

inline std::mutex& choices_mutex() {
  static std::mutex m;
  return m;
}

inline std::map<ChoiceKey, Choice>& choices() {
  static std::map<ChoiceKey, Choice> c;
  return c;
}

// Operands at least this large are timed with cold caches (below); smaller ones may well stay
// cached in a step, and their timings are too short for a cache sweep to be worth it.
constexpr int64_t kColdTimingBytes = 1 << 20;

// The size of the last-level cache the calling core shares, from the size of cpu0's highest cache
// instance in sysfs. glibc's sysconf(_SC_LEVEL3_CACHE_SIZE) can report the whole package's L3
// instead, ten times the instance a small VM's core shares, which made the sweep below that much
// larger than it needs to be.
inline size_t read_last_level_cache_bytes() {
  size_t bytes = 0;
  for (int index = 0; index < 8; ++index) {
    std::ifstream file("/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/size");
    size_t size = 0;
    std::string unit;
    if (!(file >> size)) break;
    file >> unit;  // "32768K", read as 32768 and "K"
    const size_t scale = unit == "K" ? size_t{1} << 10 : unit == "M" ? size_t{1} << 20 : 1;
    bytes = std::max(bytes, size * scale);
  }
  if (bytes == 0) {
    const long llc = sysconf(_SC_LEVEL3_CACHE_SIZE);
    bytes = llc > 0 ? static_cast<size_t>(llc) : size_t{32} << 20;
  }
  return std::min(bytes, size_t{128} << 20);
}

// Read once: it is the same for the process, and every cold choice asks.
inline size_t last_level_cache_bytes() {
  static const size_t bytes = read_last_level_cache_bytes();
  return bytes;
}

// Puts the machine in the state a GEMM of a training step meets (bench/NOTES.md):
// - Caches cold: the frozen GEMMs in between stream the whole cache. Timed hot, the skinny
//   products rank differently: the library that wins hot can lose cold. A sweep over twice the
//   last-level cache evicts it.
// - The heap given back to the system: a step's large frees let glibc trim it, so a fresh output
//   is faulted in page by page, while a warm timing loop reuses one freed block and never pays
//   that. Candidates that write in place pay nothing, and only this timing sees the difference: a
//   frozen GEMM into a new output once measured faster than ATen's addmm_ in place warm, and cost
//   more in every step.
// The sweep's buffer lives only while one choice is timed: kept for the process, it stayed in
// the resident memory of every user of the op (bench/NOTES.md has the numbers of all three).
class ColdCaches {
 public:
  ColdCaches() : bytes_(2 * last_level_cache_bytes()), sweep_(new unsigned char[bytes_]()) {}
  void make_cold() {
#if defined(__GLIBC__)
    malloc_trim(0);
#endif
    // One write a cache line, volatile: the buffer is freed unread, so plain stores could be dropped.
    volatile unsigned char* sweep = sweep_.get();
    for (size_t i = 0; i < bytes_; i += 64) sweep[i] = sweep[i] + 1;
  }

 private:
  size_t bytes_;
  std::unique_ptr<unsigned char[]> sweep_;
};

// Times each candidate and returns the fastest, with what was measured (for gemm_choices()).
template <typename Run>
Choice timed_choice(const std::vector<Candidate>& candidates, at::ScalarType dtype, int64_t m, int64_t k, int64_t n,
                    const Run& run) {
  Candidate best = candidates.front();
  std::ostringstream timings;
  if (candidates.size() == 1) return Choice{best, "the only one allowed"};
  // Rounds of one call each, interleaved, so that drift in the machine's speed falls on every
  // candidate alike; each keeps its fastest call, made with cold caches where the operands are big.
  const int64_t bytes = (m * k + k * n + m * n) * static_cast<int64_t>(c10::elementSize(dtype));
  const bool cold = bytes >= kColdTimingBytes;
  std::optional<ColdCaches> caches;
  if (cold) caches.emplace();
  constexpr int kRounds = 5;
  std::vector<double> fastest(candidates.size(), -1.0);
  std::vector<bool> runs(candidates.size(), true);
  for (size_t i = 0; i < candidates.size(); ++i) {
    try {
      run(candidates[i]);  // warm-up: first-call costs (oneDNN's primitive creation) are not the steady state
    } catch (const std::exception&) {
      runs[i] = false;  // not for this CPU or dtype
    }
  }
  for (int round = 0; round < kRounds; ++round) {
    for (size_t i = 0; i < candidates.size(); ++i) {
      if (!runs[i]) continue;
      if (cold) caches->make_cold();
      const auto start = std::chrono::steady_clock::now();
      run(candidates[i]);
      const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count();
      fastest[i] = fastest[i] < 0 ? us : std::min(fastest[i], us);
    }
  }
  double best_us = -1.0;
  timings << (cold ? "cold: " : "hot: ");
  for (size_t i = 0; i < candidates.size(); ++i) {
    timings << (i > 0 ? ", " : "") << candidates[i].name();
    if (!runs[i]) {
      timings << " failed";
      continue;
    }
    timings << " " << static_cast<int64_t>(fastest[i]) << " us";
    if (best_us < 0 || fastest[i] < best_us) best_us = fastest[i], best = candidates[i];
  }
  return Choice{best, timings.str()};
}

// The candidate of `candidates` that a stored row names; none where this process may not take
// it (another cpu_gemm setting is in the key, but a build without one of our kernels is not).
inline std::optional<Candidate> candidate_named(const std::string& name, const std::vector<Candidate>& candidates) {
  for (const Candidate& c : candidates) {
    if (name == c.name()) return c;
  }
  return std::nullopt;
}

// The candidate for this GEMM among candidates(): the one this machine picked before (the choice
// store, choice_store.h), else the one measured fastest now, once per shape class; or the only one.
template <typename Candidates, typename Run>
Candidate choose_from(const char* gemm, at::ScalarType dtype, int64_t m, int64_t k, int64_t n,
                      const Candidates& make_candidates, const Run& run) {
  const ChoiceKey key{gemm, dtype, static_cast<int>(cpu_gemm()), size_class(m), size_class(k), size_class(n)};
  {
    std::lock_guard<std::mutex> lock(choices_mutex());
    auto it = choices().find(key);
    if (it != choices().end()) return it->second.candidate;
  }
  const std::vector<Candidate> candidates = make_candidates();
  // Held from the look-up to the append: a process that misses while another times waits for its pick.
  const choice_store::LockedFile file(candidates.size() > 1 ? choice_store::path() : std::string());
  const std::string row = choice_store::row_key(gemm, c10::toString(dtype), key.mode, at::get_num_threads(), key.m,
                                                key.k, key.n);
  const std::optional<choice_store::Stored> stored = file.find(row);
  const std::optional<Candidate> picked = stored ? candidate_named(stored->candidate, candidates) : std::nullopt;
  Choice choice;
  if (picked) {
    choice = Choice{*picked, "stored: " + stored->timings};
  } else {
    choice = timed_choice(candidates, dtype, m, k, n, run);
    if (candidates.size() > 1) file.append(row, choice.candidate.name(), choice.timings);
  }
  std::lock_guard<std::mutex> lock(choices_mutex());
  choices().emplace(key, choice);
  return choice.candidate;
}

// The candidate for this GEMM: the one measured fastest (once per shape class), or the only one allowed.
template <typename Run>
Candidate choose(const char* gemm, at::ScalarType dtype, int64_t m, int64_t k, int64_t n, bool transposable,
                 const Run& run, bool fusable = false, bool thin = false) {
  return choose_from(gemm, dtype, m, k, n, [&] { return allowed_candidates(dtype, transposable, fusable, thin); }, run);
}

// Whether to compute two products in one pass (our kernel) or separately (each on its own
// choice), measured once per shape class like a GEMM's candidates.
template <typename Run>
bool one_pass(const char* gemm, at::ScalarType dtype, int64_t m, int64_t k, int64_t n, const Run& run) {
  auto make_candidates = [] {
    std::vector<Candidate> out;
    for (const Candidate c : {Candidate{false, false, false, true}, Candidate{false, false, false, false, true}}) {
      if (allowed(cpu_gemm(), c)) out.push_back(c);
    }
    return out;
  };
  return choose_from(gemm, dtype, m, k, n, make_candidates, run).thin;
}

// One line per choice made so far: GEMM, dtype, shape class -> candidate (timings).
inline std::string gemm_choices() {
  std::lock_guard<std::mutex> lock(choices_mutex());
  std::ostringstream out;
  for (const auto& [key, choice] : choices()) {
    out << key.gemm << " " << c10::toString(key.dtype) << " " << key.m << "x" << key.k << "x" << key.n << " -> "
        << choice.candidate.name() << " (" << choice.timings << ")\n";
  }
  return out.str();
}

inline void forget_gemm_choices() {
  std::lock_guard<std::mutex> lock(choices_mutex());
  choices().clear();
}

// a @ b with candidate c; the result is row-major unless c is transposed.
inline at::Tensor product_with(const Candidate& c, const at::Tensor& a, const at::Tensor& b) {
  if (c.thin) return thin_product::form(a, b) != thin_product::Form::kNone ? thin_product::run(a, b) : at::mm(a, b);
  if (c.onednn) {
    return c.transposed ? onednn_linear(b.t(), a, c10::nullopt).t() : onednn_linear(a, b.t(), c10::nullopt);
  }
  return c.transposed ? at::mm(b.t(), a.t()).t() : at::mm(a, b);
}

// A rank-R product a @ b of the adapter, row-major. `transposable` lets a transposed candidate run;
// its column-major result is then copied (transpose.h), and timed with the copy: timed without
// it, a transposed candidate won by less than the copy it then needed cost.
inline at::Tensor product(const char* gemm, const at::Tensor& a, const at::Tensor& b, bool transposable = true) {
  if (a.numel() == 0 || b.numel() == 0) return at::mm(a, b);
  auto row_major_product = [&](const Candidate& cand) { return transpose::row_major(product_with(cand, a, b)); };
  const Candidate c = choose(gemm, a.scalar_type(), a.size(0), a.size(1), b.size(1), transposable, row_major_product,
                             /*fusable=*/false, thin_product::form(a, b) != thin_product::Form::kNone);
  return row_major_product(c);
}

// x w^T + bias, the frozen GEMM, into a new row-major output as nn.Linear computes it: on ATen
// (addmm, which F.linear runs) or oneDNN's linear, whichever was measured faster. w is (out, in),
// any strides. The adapter's term is added into this output afterwards (add_expanded in
// msplora_cpu.cpp), while the GEMM has left it in cache: the other order, the skinny term first
// into a new tensor and the GEMM accumulating into it, measured slower (bench/NOTES.md).
inline at::Tensor frozen_linear(const char* gemm, const at::Tensor& x, const at::Tensor& w,
                                const c10::optional<at::Tensor>& bias) {
  const bool has_bias = bias.has_value() && bias->defined();
  auto aten = [&]() { return has_bias ? at::addmm(*bias, x, w.t()) : at::mm(x, w.t()); };
  if (x.numel() == 0 || w.numel() == 0) return aten();
  const Candidate c = choose(gemm, x.scalar_type(), x.size(0), x.size(1), w.size(0), /*transposable=*/false,
                             [&](const Candidate& cand) { cand.onednn ? onednn_linear(x, w, bias) : aten(); });
  return c.onednn ? onednn_linear(x, w, bias) : aten();
}

}  // namespace msplora
