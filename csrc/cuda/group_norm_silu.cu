// CUDA kernel of the fused GroupNorm + SiLU forward (csrc/group_norm_silu.h): one block per
// (n, group). When the group fits in shared memory (the DDPM U-Net's do: at most 8 channels ×
// 32×32 = 32 KiB in float32) the first sweep keeps x + add there, so x is read from global
// memory once and y written once; larger groups are read again by each of the three sweeps
// (sum, squared deviations, output). Statistics are float32 (float64 for float64 x), the mean
// and rstd are written for the backward, which on CUDA is the Triton kernel
// (ddpm_fast/ops/group_norm_silu.py).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../group_norm_silu.h"

namespace ddpm_fast {
namespace {

constexpr int kThreads = 512;
constexpr int64_t kSharedBytes = 48 * 1024;  // without opting in to more

// Sum over the block, returned to every thread; `scratch` holds one value per warp.
template <typename A>
__device__ A block_sum(A v, A* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read by the previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  A total = 0;
  for (int w = 0; w < blockDim.x / 32; ++w) total += scratch[w];
  return total;
}

__device__ __forceinline__ float exp_neg(float z) { return __expf(-z); }
__device__ __forceinline__ double exp_neg(double z) { return exp(-z); }

// Element i of an (n, group) block: position-major in NHWC, channel-major in NCHW.
template <bool kNCHW>
struct BlockIndex {
  int64_t group_channels, hw, channels;
  __device__ int64_t channel(int64_t i) const { return kNCHW ? i / hw : i % group_channels; }
  __device__ int64_t offset(int64_t i) const { return kNCHW ? i : (i / group_channels) * channels + i % group_channels; }
};

template <typename T, bool kNCHW, bool kAct>
__global__ void group_norm_silu_kernel(const T* __restrict__ x, const T* __restrict__ weight,
                                       const T* __restrict__ bias, const T* __restrict__ add, T* __restrict__ y,
                                       at::opmath_type<T>* __restrict__ mean_out,
                                       at::opmath_type<T>* __restrict__ rstd_out, GroupNormShape s, double eps,
                                       bool cached) {
  using A = at::opmath_type<T>;
  extern __shared__ __align__(16) unsigned char shared_raw[];
  A* cache = reinterpret_cast<A*>(shared_raw);
  __shared__ A scratch[kThreads / 32];
  const int64_t n = blockIdx.x / s.groups, g = blockIdx.x % s.groups;
  const int64_t cg = s.group_channels(), c0 = g * cg, count = cg * s.hw;
  const BlockIndex<kNCHW> index{cg, s.hw, s.channels};
  const T* xb = x + s.group_offset(n, g);
  const T* addb = add == nullptr ? nullptr : add + n * s.channels + c0;
  const auto value = [&](int64_t i) {  // x + add
    const A v = static_cast<A>(xb[index.offset(i)]);
    return addb == nullptr ? v : v + static_cast<A>(addb[index.channel(i)]);
  };
  A sum = 0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    const A v = value(i);
    if (cached) cache[i] = v;
    sum += v;
  }
  const A mean = block_sum(sum, scratch) / static_cast<A>(count);
  A squares = 0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    const A d = (cached ? cache[i] : value(i)) - mean;
    squares += d * d;
  }
  const A rstd = static_cast<A>(1) / sqrt(block_sum(squares, scratch) / static_cast<A>(count) + static_cast<A>(eps));
  T* yb = y + s.group_offset(n, g);
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    const int64_t c = c0 + index.channel(i);
    const A z = ((cached ? cache[i] : value(i)) - mean) * rstd * static_cast<A>(weight[c]) + static_cast<A>(bias[c]);
    yb[index.offset(i)] = static_cast<T>(kAct ? z / (static_cast<A>(1) + exp_neg(z)) : z);
  }
  if (threadIdx.x == 0) {
    mean_out[blockIdx.x] = mean;
    rstd_out[blockIdx.x] = rstd;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_cuda(const at::Tensor& x_in, const at::Tensor& weight,
                                                                    const at::Tensor& bias,
                                                                    const std::optional<at::Tensor>& add,
                                                                    int64_t num_groups, double eps, bool act) {
  const GroupNormInputs in = prepare_inputs("ddpm_fast::group_norm_silu", x_in, weight, bias, add, num_groups);
  const GroupNormShape& s = in.shape;
  const c10::cuda::CUDAGuard guard(in.x.device());
  at::Tensor y, mean, rstd;
  std::tie(y, mean, rstd) = empty_outputs(in.x, s);
  const int64_t blocks = s.batch * s.groups;
  TORCH_CHECK(blocks < (int64_t{1} << 31), "ddpm_fast::group_norm_silu: N·num_groups = ", blocks,
              " exceeds the grid limit 2^31 − 1");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "group_norm_silu_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const int64_t bytes = s.group_channels() * s.hw * static_cast<int64_t>(sizeof(A));
    const bool cached = bytes <= kSharedBytes;
    const size_t shared = cached ? static_cast<size_t>(bytes) : 0;
    const auto launch = [&](auto kernel) {
      kernel<<<static_cast<unsigned int>(blocks), kThreads, shared, c10::cuda::getCurrentCUDAStream()>>>(
          in.x.const_data_ptr<scalar_t>(), in.weight.const_data_ptr<scalar_t>(), in.bias.const_data_ptr<scalar_t>(),
          in.add.defined() ? in.add.const_data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(), mean.data_ptr<A>(),
          rstd.data_ptr<A>(), s, eps, cached);
    };
    if (s.nchw) {
      act ? launch(group_norm_silu_kernel<scalar_t, true, true>) : launch(group_norm_silu_kernel<scalar_t, true, false>);
    } else {
      act ? launch(group_norm_silu_kernel<scalar_t, false, true>)
          : launch(group_norm_silu_kernel<scalar_t, false, false>);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, mean, rstd};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) {
  m.impl("group_norm_silu", &group_norm_silu_cuda);
}

}  // namespace ddpm_fast
