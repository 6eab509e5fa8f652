// CUDA launchers of the noise ops; the kernel bodies, shared with the host emulator, are
// csrc/cuda/noise.cuh.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "noise.cuh"

namespace ddpm_fast {
namespace {

__global__ void philox4x32_10_kernel(const uint32_t* __restrict__ in, uint32_t* __restrict__ out,
                                     int64_t calls, uint64_t key) {
  philox4x32_10_body(CudaThread{}, in, out, calls, key);
}

__global__ void randn_kernel(float* __restrict__ out, NoiseShape shape, uint64_t seed,
                             uint32_t step, uint32_t sample_offset) {
  randn_body(CudaThread{}, out, shape, seed, step, sample_offset);
}

at::Tensor philox4x32_10_cuda(const at::Tensor& counter, int64_t seed) {
  const c10::cuda::CUDAGuard guard(counter.device());
  return run_philox4x32_10(counter, seed, [](unsigned int blocks, auto... args) {
    philox4x32_10_kernel<<<blocks, kNoiseThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void randn_cuda(const at::Tensor& out, int64_t seed, int64_t step, int64_t sample_offset) {
  const c10::cuda::CUDAGuard guard(out.device());
  run_randn_(out, seed, step, sample_offset, [](unsigned int blocks, auto... args) {
    randn_kernel<<<blocks, kNoiseThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) {
  m.impl("philox4x32_10", &philox4x32_10_cuda);
  m.impl("randn_", &randn_cuda);
}

}  // namespace ddpm_fast
