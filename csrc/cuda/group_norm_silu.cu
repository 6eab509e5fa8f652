// CUDA launcher of the fused GroupNorm + SiLU forward; the kernel body and the op's host side, shared
// with the host emulator, are csrc/cuda/group_norm_silu.cuh.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "group_norm_silu.cuh"

namespace ddpm_fast {
namespace {

template <typename T, bool kNCHW, bool kAct>
__global__ void group_norm_silu_kernel(const T* __restrict__ x, const T* __restrict__ weight,
                                       const T* __restrict__ bias, const T* __restrict__ add,
                                       const T* __restrict__ scale, const T* __restrict__ shift, T* __restrict__ y,
                                       at::opmath_type<T>* __restrict__ mean_out,
                                       at::opmath_type<T>* __restrict__ rstd_out, GroupNormShape s, double eps,
                                       bool cached) {
  using A = at::opmath_type<T>;
  extern __shared__ __align__(16) unsigned char shared_raw[];
  __shared__ A scratch[kGroupNormWarps];
  group_norm_silu_block<kNCHW, kAct>(CudaThread{}, reinterpret_cast<A*>(shared_raw), scratch, x, weight, bias, add,
                                     scale, shift, y, mean_out, rstd_out, s, eps, cached);
}

// The kernel's static shared memory as the runtime counts it, read once per instantiation.
template <class Kernel>
int64_t static_shared_bytes() {
  static const int64_t bytes = [] {
    cudaFuncAttributes attributes;
    C10_CUDA_CHECK(cudaFuncGetAttributes(
        &attributes, group_norm_silu_kernel<typename Kernel::scalar_t, Kernel::kNCHW, Kernel::kAct>));
    return static_cast<int64_t>(attributes.sharedSizeBytes);
  }();
  return bytes;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                                    const at::Tensor& bias,
                                                                    const std::optional<at::Tensor>& add,
                                                                    const std::optional<at::Tensor>& scale,
                                                                    const std::optional<at::Tensor>& shift,
                                                                    int64_t num_groups, double eps, bool act) {
  const c10::cuda::CUDAGuard guard(x.device());
  return run_group_norm_silu(x, weight, bias, add, scale, shift, num_groups, eps, act,
                             [](auto kernel, unsigned int blocks, int64_t group_bytes, auto... args) {
    using Kernel = decltype(kernel);
    const auto function = group_norm_silu_kernel<typename Kernel::scalar_t, Kernel::kNCHW, Kernel::kAct>;
    const GroupNormSharedPlan plan = group_norm_shared_plan(
        group_bytes, static_shared_bytes<Kernel>(), at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
    if (plan.opt_in) {  // set per launch: the attribute belongs to the current device's copy of the kernel
      C10_CUDA_CHECK(cudaFuncSetAttribute(function, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(plan.dynamic_bytes)));
    }
    function<<<blocks, kGroupNormThreads, static_cast<size_t>(plan.dynamic_bytes),
               c10::cuda::getCurrentCUDAStream()>>>(args..., plan.cached);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) {
  m.impl("group_norm_silu", &group_norm_silu_cuda);
}

}  // namespace ddpm_fast
