// Prefetching a run of cache lines spread over the steps of a loop: a few lines a step, so that
// the requests reach memory as a steady stream while the loop computes (a burst, or the hardware
// prefetcher alone, left our kernels waiting on memory: bench/NOTES.md).
#pragma once

#include <cstdint>

namespace msplora {

// Lines [0, lines) from `base`, in order, ceil(lines / steps) per step().
template <bool kForWrite = false>
class SpreadPrefetch {
 public:
  SpreadPrefetch(const void* base, int64_t lines, int64_t steps)
      : base_(static_cast<const char*>(base)), lines_(lines), per_step_(steps > 0 ? (lines + steps - 1) / steps : 0) {}

  void step() {
    for (int64_t i = 0; i < per_step_ && next_ < lines_; ++i, ++next_) __builtin_prefetch(base_ + next_ * 64, kForWrite, 3);
  }

 private:
  const char* base_;
  int64_t lines_, per_step_, next_ = 0;
};

}  // namespace msplora
