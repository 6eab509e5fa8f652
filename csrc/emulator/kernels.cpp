// The CUDA C++ ops run by the host emulator (DESIGN §5.6): each op's host side and kernel body from
// csrc/cuda/<op>.cuh, the very code the CUDA launcher runs, with the launch emulated by HostGrid on
// CPU tensors. Registered as torch.ops.ddpm_fast_emulator.*; built only by the tests (tests/emulator.py).
// Every op takes `blocks` (0: the launcher's grid; fewer blocks run the grid-stride loops more than
// once) and `reverse` (blocks, warps and threads in reverse order, HostGrid); GroupNorm takes the device's
// opt-in shared memory, and its launch is refused as the CUDA runtime would refuse it.
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "../cuda/diffusion_step.cuh"
#include "../cuda/group_norm_silu.cuh"
#include "../cuda/noise.cuh"
#include "host_grid.h"

namespace ddpm_fast {
namespace emulator {
namespace {

// A block's shared memory of `count` values: NaN bytes before each block (it is not cleared between
// blocks on a GPU either: a read before a write shows), between guard bands that a write past either
// end changes.
template <typename A>
class SharedMemory {
 public:
  explicit SharedMemory(size_t count) : bytes_((count + 2 * kGuard) * sizeof(A), kBand) {}
  A* data() { return reinterpret_cast<A*>(bytes_.data()) + kGuard; }
  // before each block: the previous one wrote only inside; then NaN inside
  void reset() {
    check();
    std::fill(bytes_.begin() + kGuard * sizeof(A), bytes_.end() - kGuard * sizeof(A), 0xff);
  }
  void check() const {
    const auto band = [](unsigned char b) { return b == kBand; };
    TORCH_CHECK(std::all_of(bytes_.begin(), bytes_.begin() + kGuard * sizeof(A), band) &&
                    std::all_of(bytes_.end() - kGuard * sizeof(A), bytes_.end(), band),
                "emulated kernel: a write outside its shared memory");
  }

 private:
  static constexpr size_t kGuard = 64;
  static constexpr unsigned char kBand = 0xa5;
  std::vector<unsigned char> bytes_;
};

// Runs body(thread) over a grid of `blocks` (or `requested` when > 0) × `threads`.
template <class Body>
void run_grid(unsigned int blocks, int64_t requested, int threads, bool reverse, const Body& body,
              const std::function<void(unsigned int)>& block_start = [](unsigned int) {}) {
  TORCH_CHECK(requested >= 0 && requested < (int64_t{1} << 31), "blocks must be in [0, 2^31), got ", requested);
  HostGrid grid(requested > 0 ? static_cast<unsigned int>(requested) : blocks, threads, reverse);
  grid.run(body, block_start);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu(const at::Tensor& x, const at::Tensor& weight,
                                                               const at::Tensor& bias,
                                                               const std::optional<at::Tensor>& add,
                                                               const std::optional<at::Tensor>& scale,
                                                               const std::optional<at::Tensor>& shift,
                                                               int64_t num_groups, double eps, bool act,
                                                               int64_t optin_bytes, int64_t blocks, bool reverse) {
  return run_group_norm_silu(x, weight, bias, add, scale, shift, num_groups, eps, act,
                             [&](auto kernel, unsigned int grid, int64_t group_bytes, auto... args) {
    using Kernel = decltype(kernel);
    using A = at::opmath_type<typename Kernel::scalar_t>;
    // the kernel's static shared memory: __shared__ A scratch[kGroupNormWarps] (csrc/cuda/group_norm_silu.cu)
    const int64_t static_bytes = kGroupNormWarps * static_cast<int64_t>(sizeof(A));
    const GroupNormSharedPlan plan = group_norm_shared_plan(group_bytes, static_bytes, optin_bytes);
    // the CUDA runtime's rule: static + dynamic within 48 KiB, or within the opt-in limit when the
    // launcher opted in (cudaFuncSetAttribute refuses more)
    const int64_t limit = plan.opt_in ? optin_bytes : kDefaultSharedBytes;
    TORCH_CHECK(static_bytes + plan.dynamic_bytes <= limit, "emulated launch refused: ", static_bytes,
                " B static + ", plan.dynamic_bytes, " B dynamic shared memory exceeds ", limit, " B",
                plan.opt_in ? " (the opt-in limit)" : " (not opted in)");
    SharedMemory<A> cache(static_cast<size_t>(plan.dynamic_bytes) / sizeof(A)), scratch(kGroupNormWarps);
    run_grid(grid, blocks, kGroupNormThreads, reverse, [&](const HostThread& t) {
      group_norm_silu_block<Kernel::kNCHW, Kernel::kAct>(t, cache.data(), scratch.data(), args..., plan.cached);
    }, [&](unsigned int) {
      cache.reset();
      scratch.reset();
    });
    cache.check();
    scratch.check();
  });
}

void diffusion_step_(const at::Tensor& x, const at::Tensor& out, const at::Tensor& coefs, const at::Tensor& noise_keys,
                     const at::Tensor& step_index, int64_t seed, int64_t sample_offset,
                     const std::optional<at::Tensor>& history, const std::optional<at::Tensor>& uncond,
                     const std::optional<at::Tensor>& grad, const std::optional<at::Tensor>& var, int64_t blocks,
                     bool reverse) {
  run_diffusion_step_(x, out, coefs, noise_keys, step_index, seed, sample_offset, history, uncond, grad, var,
                      [&](auto, unsigned int grid, auto... args) {
    run_grid(grid, blocks, kStepThreads, reverse, [&](const HostThread& t) { step_body(t, args...); });
  });
}

void randn_(const at::Tensor& out, int64_t seed, int64_t step, int64_t sample_offset, int64_t blocks, bool reverse) {
  run_randn_(out, seed, step, sample_offset, [&](unsigned int grid, auto... args) {
    run_grid(grid, blocks, kNoiseThreads, reverse, [&](const HostThread& t) { randn_body(t, args...); });
  });
}

at::Tensor philox4x32_10(const at::Tensor& counter, int64_t seed, int64_t blocks, bool reverse) {
  return run_philox4x32_10(counter, seed, [&](unsigned int grid, auto... args) {
    run_grid(grid, blocks, kNoiseThreads, reverse, [&](const HostThread& t) { philox4x32_10_body(t, args...); });
  });
}

// Bodies that break the rules the emulator enforces, for its own test: a barrier thread 0 skips
// ("barrier"), a shuffle half a warp skips ("shuffle"), a shuffle in a partial warp ("partial warp").
void misbehave(const std::string& kind) {
  const bool partial = kind == "partial warp";
  TORCH_CHECK(partial || kind == "barrier" || kind == "shuffle", "unknown kind ", kind);
  run_grid(1, 0, partial ? 48 : 64, false, [&](const HostThread& t) {
    if (kind == "shuffle" && t.thread() % 32 >= 16) return;
    t.shfl_down(1.0f, 1);
    if (kind == "barrier" && t.thread() == 0) return;
    t.sync();
  });
}

// The launcher's shared-memory plan (group_norm_shared_plan) for tests/test_kernel_resources.py:
// (cached, dynamic bytes, opt in).
std::tuple<bool, int64_t, bool> group_norm_shared_plan_of(int64_t group_bytes, int64_t static_bytes,
                                                          int64_t optin_bytes) {
  const GroupNormSharedPlan plan = group_norm_shared_plan(group_bytes, static_bytes, optin_bytes);
  return {plan.cached, plan.dynamic_bytes, plan.opt_in};
}

}  // namespace
}  // namespace emulator
}  // namespace ddpm_fast

TORCH_LIBRARY(ddpm_fast_emulator, m) {
  using namespace ddpm_fast::emulator;
  m.def("group_norm_silu(Tensor x, Tensor weight, Tensor bias, Tensor? add, Tensor? scale, Tensor? shift, "
        "int num_groups, float eps, bool act, int optin_bytes, int blocks, bool reverse) -> (Tensor, Tensor, Tensor)",
        &group_norm_silu);
  m.def("diffusion_step_(Tensor(a!) x, Tensor model_output, Tensor coefs, Tensor noise_keys, Tensor step_index, "
        "int seed, int sample_offset, Tensor(b!)? history, Tensor? uncond_output, Tensor? guidance_grad, "
        "Tensor? variance_output, int blocks, bool reverse) -> ()",
        &diffusion_step_);
  m.def("randn_(Tensor(a!) out, int seed, int step, int sample_offset, int blocks, bool reverse) -> ()", &randn_);
  m.def("philox4x32_10(Tensor counter, int seed, int blocks, bool reverse) -> Tensor", &philox4x32_10);
  m.def("misbehave(str kind) -> ()", &misbehave);
  m.def("group_norm_shared_plan(int group_bytes, int static_bytes, int optin_bytes) -> (bool, int, bool)",
        &group_norm_shared_plan_of);
}
