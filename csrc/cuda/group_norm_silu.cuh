// The CUDA kernel body of the fused GroupNorm + SiLU forward (csrc/group_norm_silu.h) and the host
// side of its launch, for nvcc (csrc/cuda/group_norm_silu.cu) and the host emulator (csrc/emulator/,
// DESIGN §5.6). One block per (n, group). When the group fits in shared memory (up to the device's
// opt-in limit: every group of the CIFAR-10 U-Net, the largest 12 channels × 32×32 = 48 KiB in
// float32) the first sweep keeps x + add there, so x is read from global memory once and y written
// once; larger groups are read again by each of the three sweeps (sum, squared deviations, output).
// Statistics are float32 (float64 for float64 x), the mean and rstd are written for the backward,
// which on CUDA is the Triton kernel (ddpm_fast/ops/group_norm_silu.py).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include "../common/grid.h"
#include "../group_norm_silu.h"

namespace ddpm_fast {

constexpr int kGroupNormThreads = 512;
constexpr int kGroupNormWarps = kGroupNormThreads / 32;  // block_sum's scratch: one value a warp

// Sum over the block, returned to every thread; `scratch` holds one value per warp.
template <typename A, class Thread>
DDPM_FAST_DEVICE A block_sum(const Thread& t, A v, A* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) v += t.shfl_down(v, offset);
  const int warp = t.thread() / 32, lane = t.thread() % 32;
  t.sync();  // scratch may still be read by the previous call
  if (lane == 0) scratch[warp] = v;
  t.sync();
  A total = 0;
  for (int w = 0; w < t.threads() / 32; ++w) total += scratch[w];
  return total;
}

DDPM_FAST_DEVICE float exp_neg(float z) {
#if defined(__CUDA_ARCH__)
  return __expf(-z);
#else
  return std::exp(-z);
#endif
}
DDPM_FAST_DEVICE double exp_neg(double z) { return exp(-z); }

// Element i of an (n, group) block: position-major in NHWC, channel-major in NCHW.
template <bool kNCHW>
struct BlockIndex {
  int64_t group_channels, hw, channels;
  DDPM_FAST_DEVICE int64_t channel(int64_t i) const { return kNCHW ? i / hw : i % group_channels; }
  DDPM_FAST_DEVICE int64_t offset(int64_t i) const {
    return kNCHW ? i : (i / group_channels) * channels + i % group_channels;
  }
};

// One block's (n, group), the parameters as __restrict__ as the kernel's (csrc/cuda/diffusion_step.cuh
// says why); `cache` is the dynamic shared memory (the group's count values when `cached`),
// `scratch` block_sum's. add, scale and shift may be null.
template <bool kNCHW, bool kAct, typename T, class Thread>
DDPM_FAST_DEVICE void group_norm_silu_block(const Thread& t, at::opmath_type<T>* cache, at::opmath_type<T>* scratch,
                                            const T* __restrict__ x, const T* __restrict__ weight,
                                            const T* __restrict__ bias, const T* __restrict__ add,
                                            const T* __restrict__ scale, const T* __restrict__ shift, T* __restrict__ y,
                                            at::opmath_type<T>* __restrict__ mean_out,
                                            at::opmath_type<T>* __restrict__ rstd_out, const GroupNormShape& s,
                                            double eps, bool cached) {
  using A = at::opmath_type<T>;
  using std::sqrt;
  const int64_t n = t.block() / s.groups, g = t.block() % s.groups;
  const int64_t cg = s.group_channels(), c0 = g * cg, count = cg * s.hw;
  const BlockIndex<kNCHW> index{cg, s.hw, s.channels};
  const T* xb = x + s.group_offset(n, g);
  const T* addb = add == nullptr ? nullptr : add + n * s.channels + c0;
  const auto value = [&](int64_t i) {  // x + add
    const A v = static_cast<A>(xb[index.offset(i)]);
    return addb == nullptr ? v : v + static_cast<A>(addb[index.channel(i)]);
  };
  A sum = 0;
  for (int64_t i = t.thread(); i < count; i += t.threads()) {
    const A v = value(i);
    if (cached) cache[i] = v;
    sum += v;
  }
  const A mean = block_sum(t, sum, scratch) / static_cast<A>(count);
  A squares = 0;
  for (int64_t i = t.thread(); i < count; i += t.threads()) {
    const A d = (cached ? cache[i] : value(i)) - mean;
    squares += d * d;
  }
  const A rstd = static_cast<A>(1) / sqrt(block_sum(t, squares, scratch) / static_cast<A>(count) + static_cast<A>(eps));
  T* yb = y + s.group_offset(n, g);
  // the output sweep, with the scale-shift's per-(n, c) coefficients or without (a compile-time
  // flag: the sweep without them is the loop it was before they existed)
  const auto write = [&](auto scale_shift) {
    for (int64_t i = t.thread(); i < count; i += t.threads()) {
      const int64_t c = c0 + index.channel(i);
      A w = static_cast<A>(weight[c]), b = static_cast<A>(bias[c]);
      if constexpr (decltype(scale_shift)::value) apply_scale_shift(w, b, scale, shift, n * s.channels + c);
      const A z = ((cached ? cache[i] : value(i)) - mean) * rstd * w + b;
      yb[index.offset(i)] = static_cast<T>(kAct ? z / (static_cast<A>(1) + exp_neg(z)) : z);
    }
  };
  if (scale != nullptr || shift != nullptr) {
    write(std::true_type{});
  } else {
    write(std::false_type{});
  }
  if (t.thread() == 0) {
    mean_out[t.block()] = mean;
    rstd_out[t.block()] = rstd;
  }
}

// Shared memory per block that a kernel may use without asking (static + dynamic), on every GPU.
constexpr int64_t kDefaultSharedBytes = 48 * 1024;

// How a launch uses shared memory (DESIGN §5.2): the group is cached whenever it fits beside the
// kernel's static shared memory within the device's opt-in limit; past the 48 KiB default the
// launcher opts in (cudaFuncAttributeMaxDynamicSharedMemorySize = dynamic_bytes).
struct GroupNormSharedPlan {
  bool cached;
  int64_t dynamic_bytes;
  bool opt_in;
};

inline GroupNormSharedPlan group_norm_shared_plan(int64_t group_bytes, int64_t static_bytes, int64_t optin_bytes) {
  const bool cached = static_bytes + group_bytes <= optin_bytes;
  const int64_t dynamic_bytes = cached ? group_bytes : 0;
  return {cached, dynamic_bytes, static_bytes + dynamic_bytes > kDefaultSharedBytes};
}

// The instantiation a call needs: group_norm_silu_block<kNCHW, kAct, T>.
template <typename T, bool NCHW, bool Act>
struct GroupNormKernel {
  using scalar_t = T;
  static constexpr bool kNCHW = NCHW, kAct = Act;
};

// The op's host side (checks, outputs, the kernel's arguments) around a launch, so that the CUDA
// launcher and the emulator run the same: launch(GroupNormKernel<…>{}, blocks, group_bytes, args…)
// must run the block body over args…, cached (which it decides from group_bytes).
template <class Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_group_norm_silu(const at::Tensor& x_in, const at::Tensor& weight,
                                                                   const at::Tensor& bias,
                                                                   const std::optional<at::Tensor>& add,
                                                                   const std::optional<at::Tensor>& scale,
                                                                   const std::optional<at::Tensor>& shift,
                                                                   int64_t num_groups, double eps, bool act,
                                                                   Launch&& launch) {
  const GroupNormInputs in =
      prepare_inputs("ddpm_fast::group_norm_silu", x_in, weight, bias, add, scale, shift, num_groups);
  const GroupNormShape& s = in.shape;
  at::Tensor y, mean, rstd;
  std::tie(y, mean, rstd) = empty_outputs(in.x, s);
  const int64_t blocks = s.batch * s.groups;
  TORCH_CHECK(blocks < (int64_t{1} << 31), "ddpm_fast::group_norm_silu: N·num_groups = ", blocks,
              " exceeds the grid limit 2^31 − 1");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "group_norm_silu", [&] {
    using A = at::opmath_type<scalar_t>;
    const int64_t group_bytes = s.group_channels() * s.hw * static_cast<int64_t>(sizeof(A));
    const auto start = [&](auto kernel) {
      launch(kernel, static_cast<unsigned int>(blocks), group_bytes, in.x.const_data_ptr<scalar_t>(),
             in.weight.const_data_ptr<scalar_t>(), in.bias.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(in.add),
             data_or_null<scalar_t>(in.scale), data_or_null<scalar_t>(in.shift), y.data_ptr<scalar_t>(),
             mean.data_ptr<A>(), rstd.data_ptr<A>(), s, eps);
    };
    if (s.nchw) {
      act ? start(GroupNormKernel<scalar_t, true, true>{}) : start(GroupNormKernel<scalar_t, true, false>{});
    } else {
      act ? start(GroupNormKernel<scalar_t, false, true>{}) : start(GroupNormKernel<scalar_t, false, false>{});
    }
  });
  return {y, mean, rstd};
}

}  // namespace ddpm_fast
