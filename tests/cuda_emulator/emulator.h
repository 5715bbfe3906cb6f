// A CUDA execution model on one CPU thread, for tests of csrc/cuda/*.cu without a GPU.
//
// Every CUDA thread of a block is a fiber (ucontext) with its own stack. A fiber runs until it
// reaches a barrier, __syncthreads for the block or the two inside a warp shuffle for its warp,
// and the scheduler releases a barrier once every live fiber it covers has reached it. A fiber
// that returns no longer counts, as an exited thread on the GPU. Blocks run one after another.
// What a GPU would get wrong silently (a launch beyond CUDA's limits, a full-warp shuffle after
// a lane has exited, threads that wait at different barriers forever) is recorded and returned
// by cudaGetLastError(). Not modelled: races (the schedule is one fixed interleaving) and
// uninitialized shared memory (a function-local static keeps the previous block's values).
#pragma once

#include <ucontext.h>

#include <functional>
#include <vector>

namespace emu {

enum class State { kRunnable, kAtBlockBarrier, kAtWarpBarrier, kDone };

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  dim3 thread;
  State state = State::kRunnable;
  float slot = 0.0f;  // the value this lane offers to a warp shuffle
};

inline std::vector<Fiber> fibers;
inline int current = 0;
inline ucontext_t scheduler;
inline std::function<void()> body;
inline dim3 grid_dim, block_dim, block_idx;
inline cudaError_t last_error = cudaSuccess;
constexpr size_t kStackBytes = 256 * 1024;

inline void record(cudaError_t e) {
  if (last_error == cudaSuccess) last_error = e;  // keep the first error, as CUDA does
}

inline void wait_at(State barrier) {
  fibers[current].state = barrier;
  swapcontext(&fibers[current].context, &scheduler);
}

inline void run_fiber() {
  body();
  fibers[current].state = State::kDone;  // uc_link returns to the scheduler
}

// Releases `barrier` for the fibers in [first, last) if every live one among them is waiting at it.
inline bool release(State barrier, size_t first, size_t last) {
  bool any_waiting = false;
  for (size_t i = first; i < last; ++i) {
    if (fibers[i].state == State::kDone) continue;
    if (fibers[i].state != barrier) return false;
    any_waiting = true;
  }
  for (size_t i = first; i < last; ++i) {
    if (fibers[i].state == barrier) fibers[i].state = State::kRunnable;
  }
  return any_waiting;
}

inline void run_block(int threads) {
  for (int t = 0; t < threads; ++t) {
    Fiber& f = fibers[t];
    f.thread = dim3(t % block_dim.x, (t / block_dim.x) % block_dim.y, t / (block_dim.x * block_dim.y));
    f.state = State::kRunnable;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.data();
    f.context.uc_stack.ss_size = f.stack.size();
    f.context.uc_link = &scheduler;
    makecontext(&f.context, run_fiber, 0);
  }
  for (;;) {
    bool ran = false;
    for (int t = 0; t < threads; ++t) {
      if (fibers[t].state != State::kRunnable) continue;
      current = t;
      swapcontext(&scheduler, &fibers[t].context);
      ran = true;
    }
    bool released = release(State::kAtBlockBarrier, 0, threads);
    for (int w = 0; w < threads; w += 32) released |= release(State::kAtWarpBarrier, w, std::min(w + 32, threads));
    if (ran || released) continue;
    for (int t = 0; t < threads; ++t) {
      if (fibers[t].state != State::kDone) {
        record(cudaErrorLaunchFailure);  // deadlock: threads wait at barriers no one else reaches
        return;
      }
    }
    return;
  }
}

inline bool within_limits(dim3 grid, dim3 block, size_t dynamic_smem) {
  const long threads = static_cast<long>(block.x) * block.y * block.z;
  return threads >= 1 && threads <= 1024 && block.z <= 64 && grid.x >= 1 && grid.y >= 1 && grid.z >= 1 &&
         grid.x <= 2147483647u && grid.y <= 65535 && grid.z <= 65535 && dynamic_smem == 0;
}

template <class Kernel, class... Args>
void launch(Kernel kernel, dim3 grid, dim3 block, size_t dynamic_smem, cudaStream_t, Args... args) {
  if (!within_limits(grid, block, dynamic_smem)) {
    record(cudaErrorInvalidConfiguration);
    return;
  }
  grid_dim = grid;
  block_dim = block;
  body = [&] { kernel(args...); };
  const int threads = static_cast<int>(block.x * block.y * block.z);
  if (fibers.size() < static_cast<size_t>(threads)) fibers.resize(threads);
  for (int t = 0; t < threads; ++t) fibers[t].stack.resize(kStackBytes);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        block_idx = dim3(bx, by, bz);
        run_block(threads);
      }
}

}  // namespace emu

#define threadIdx (::emu::fibers[::emu::current].thread)
#define blockIdx (::emu::block_idx)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)

inline void __syncthreads() { emu::wait_at(emu::State::kAtBlockBarrier); }

inline float __shfl_down_sync(unsigned mask, float v, int delta) {
  const int me = emu::current, first = me - me % 32;
  const int lanes = std::min(32, static_cast<int>(emu::block_dim.x * emu::block_dim.y * emu::block_dim.z) - first);
  const unsigned all = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
  for (int i = first; i < first + lanes; ++i) {
    if (emu::fibers[i].state == emu::State::kDone) emu::record(cudaErrorLaunchFailure);
  }
  if (mask != all) emu::record(cudaErrorLaunchFailure);
  emu::fibers[me].slot = v;
  emu::wait_at(emu::State::kAtWarpBarrier);
  const float out = me % 32 + delta < lanes ? emu::fibers[me + delta].slot : v;
  emu::wait_at(emu::State::kAtWarpBarrier);
  return out;
}

inline float atomicAdd(float* address, float v) {
  const float old = *address;  // one OS thread runs every fiber, so a plain add is atomic
  *address = old + v;
  return old;
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::last_error;
  emu::last_error = cudaSuccess;
  return e;
}
