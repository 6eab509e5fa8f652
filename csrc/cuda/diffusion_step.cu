// CUDA launcher of the fused sampling update; the kernel body, shared with the host emulator, is
// csrc/cuda/diffusion_step.cuh.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "diffusion_step.cuh"

namespace ddpm_fast {
namespace {

template <typename out_t>
__global__ void step_kernel(float* __restrict__ x, const out_t* __restrict__ out, float* __restrict__ history,
                            const out_t* __restrict__ uncond, const float* __restrict__ grad,
                            const out_t* __restrict__ var, Layout4d lx, Layout4d lo,
                            NoiseShape shape, const float* __restrict__ coefs, const int64_t* __restrict__ keys,
                            const int64_t* __restrict__ step_index, int64_t rows, uint64_t seed,
                            uint32_t sample_offset) {
  step_body(CudaThread{}, x, out, history, uncond, grad, var, lx, lo, shape, coefs, keys, step_index, rows, seed,
            sample_offset);
}

void diffusion_step_cuda(const at::Tensor& x, const at::Tensor& out, const at::Tensor& coefs,
                         const at::Tensor& noise_keys, const at::Tensor& step_index, int64_t seed,
                         int64_t sample_offset, const std::optional<at::Tensor>& history,
                         const std::optional<at::Tensor>& uncond, const std::optional<at::Tensor>& grad,
                         const std::optional<at::Tensor>& var) {
  const c10::cuda::CUDAGuard guard(x.device());
  run_diffusion_step_(x, out, coefs, noise_keys, step_index, seed, sample_offset, history, uncond, grad, var,
                      [](auto out_type, unsigned int blocks, auto... args) {
    step_kernel<decltype(out_type)><<<blocks, kStepThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) {
  m.impl("diffusion_step_", &diffusion_step_cuda);
}

}  // namespace ddpm_fast
