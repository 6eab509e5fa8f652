// The host emulator of a CUDA launch (DESIGN §5.6), for the kernel bodies of csrc/cuda/<op>.cuh.
// Blocks run one after another; a block's threads run as fibers on one OS thread, warp after warp:
// each thread of a warp runs until it reaches a barrier, a shuffle's (warp) or sync()'s (block);
// the warp goes on through its shuffles until its threads wait at sync() or end, then the next warp
// runs, and when every thread of the block waits at sync() all go on. So the phases between barriers
// run in sequence, as a CUDA block's may, and a warp runs ahead of the others as far as the GPU lets
// it. Warps, threads and blocks run in index order or in reverse: a body whose threads read in one
// phase what others write in it (a race) gives different results in the two orders. A barrier that
// some threads never reach, and a shuffle in a partial warp, are undefined on the GPU and raise here.
// Built only by the tests (tests/emulator.py).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace ddpm_fast {
namespace emulator {

class HostGrid;

// The index source of csrc/common/grid.h for one emulated thread.
class HostThread {
 public:
  HostThread(HostGrid* grid, unsigned int thread) : grid_(grid), thread_(thread) {}
  unsigned int block() const;
  unsigned int thread() const { return thread_; }
  unsigned int blocks() const;
  unsigned int threads() const;
  void sync() const;
  // __shfl_down_sync(0xffffffff, v, offset): lane l receives lane l + offset's v, its own past lane 31
  template <typename T>
  T shfl_down(T v, int offset) const;

 private:
  HostGrid* grid_;
  unsigned int thread_;
};

class HostGrid {
 public:
  HostGrid(unsigned int blocks, unsigned int threads, bool reverse)
      : blocks_(blocks), threads_(threads), reverse_(reverse), fibers_(threads), exchange_(16 * threads) {
    if (blocks == 0 || threads == 0) throw std::invalid_argument("a launch needs at least one block and one thread");
  }

  // Runs body(thread) for every thread of every block; block_start(block) first for each block (to
  // fill its shared memory, say).
  void run(const std::function<void(const HostThread&)>& body, const std::function<void(unsigned int)>& block_start) {
    body_ = &body;
    for (unsigned int i = 0; i < blocks_; ++i) {
      block_ = reverse_ ? blocks_ - 1 - i : i;
      block_start(block_);
      run_block();
    }
  }

  unsigned int block() const { return block_; }
  unsigned int blocks() const { return blocks_; }
  unsigned int threads() const { return threads_; }

  // Called by a fiber: wait here until every thread of the block (kBlock) or of its warp (kWarp) has arrived.
  enum class State { kRunnable, kWarp, kBlock, kDone };
  void arrive(unsigned int thread, State barrier) {
    fibers_[thread].state = barrier;
    swapcontext(&fibers_[thread].context, &scheduler_);
  }

  template <typename T>
  T shfl_down(unsigned int thread, T v, int offset) {
    static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 16, "a shuffled value is a register");
    if (threads_ % 32 != 0 || offset < 0 || offset >= 32) {
      fail("__shfl_down_sync with the full mask needs whole warps and an offset in [0, 32)");
    }
    std::memcpy(&exchange_[16 * thread], &v, sizeof(T));
    arrive(thread, State::kWarp);
    const unsigned int source = thread % 32 + offset < 32 ? thread + offset : thread;
    T received;
    std::memcpy(&received, &exchange_[16 * source], sizeof(T));
    arrive(thread, State::kWarp);  // every lane has read before the next shuffle writes
    return received;
  }

 private:
  struct Fiber {
    ucontext_t context;
    std::unique_ptr<char[]> stack;
    State state;
  };
  static constexpr size_t kStackBytes = 256 * 1024;

  static void entry(unsigned int grid_high, unsigned int grid_low, unsigned int thread) {
    auto* grid = reinterpret_cast<HostGrid*>((static_cast<uintptr_t>(grid_high) << 32) | grid_low);
    try {
      (*grid->body_)(HostThread(grid, thread));
    } catch (const std::exception& e) {
      grid->error_ = e.what();
    }
    grid->fibers_[thread].state = State::kDone;  // uc_link returns to the scheduler
  }

  [[noreturn]] void fail(const std::string& what) { throw std::runtime_error("emulated kernel: " + what); }

  void run_block() {
    const auto address = reinterpret_cast<uintptr_t>(this);
    for (unsigned int t = 0; t < threads_; ++t) {
      Fiber& f = fibers_[t];
      if (!f.stack) f.stack.reset(new char[kStackBytes]);
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = f.stack.get();
      f.context.uc_stack.ss_size = kStackBytes;
      f.context.uc_link = &scheduler_;
      makecontext(&f.context, reinterpret_cast<void (*)()>(&HostGrid::entry), 3,
                  static_cast<unsigned int>(address >> 32), static_cast<unsigned int>(address & 0xffffffffu), t);
      f.state = State::kRunnable;
    }
    const unsigned int warps = (threads_ + 31) / 32;
    for (int64_t barrier = 0;; ++barrier) {  // one phase: every warp up to its next sync() or its end
      for (unsigned int i = 0; i < warps; ++i) run_warp(reverse_ ? warps - 1 - i : i, barrier);
      unsigned int done = 0;
      for (Fiber& f : fibers_) {
        done += f.state == State::kDone;
        if (f.state == State::kBlock) f.state = State::kRunnable;
      }
      if (done == threads_) return;
      if (done != 0) {
        fail("block " + std::to_string(block_) + ": " + std::to_string(done) + " of " + std::to_string(threads_) +
             " threads ended while the others wait at barrier " + std::to_string(barrier));
      }
    }
  }

  // Runs warp w's threads through its shuffles until each waits at sync() or has ended.
  void run_warp(unsigned int w, int64_t barrier) {
    const unsigned int first = 32 * w, lanes = std::min(32u, threads_ - first);
    for (;;) {
      unsigned int at_shuffle = 0;
      for (unsigned int i = 0; i < lanes; ++i) {
        const unsigned int t = first + (reverse_ ? lanes - 1 - i : i);
        if (fibers_[t].state == State::kRunnable) {
          swapcontext(&scheduler_, &fibers_[t].context);
          if (!error_.empty()) fail(error_);
        }
        at_shuffle += fibers_[t].state == State::kWarp;
      }
      if (at_shuffle == 0) return;
      if (at_shuffle != lanes) {
        fail("block " + std::to_string(block_) + ", warp " + std::to_string(w) + ": " + std::to_string(at_shuffle) +
             " of " + std::to_string(lanes) + " lanes wait at a shuffle after barrier " + std::to_string(barrier) +
             " while the others do not");
      }
      for (unsigned int i = 0; i < lanes; ++i) fibers_[first + i].state = State::kRunnable;
    }
  }

  unsigned int blocks_, threads_, block_ = 0;
  bool reverse_;
  std::vector<Fiber> fibers_;
  std::vector<unsigned char> exchange_;  // one 16-byte slot a thread for shuffles
  ucontext_t scheduler_;
  const std::function<void(const HostThread&)>* body_ = nullptr;
  std::string error_;
};

inline unsigned int HostThread::block() const { return grid_->block(); }
inline unsigned int HostThread::blocks() const { return grid_->blocks(); }
inline unsigned int HostThread::threads() const { return grid_->threads(); }
inline void HostThread::sync() const { grid_->arrive(thread_, HostGrid::State::kBlock); }
template <typename T>
T HostThread::shfl_down(T v, int offset) const {
  return grid_->shfl_down(thread_, v, offset);
}

}  // namespace emulator
}  // namespace ddpm_fast
