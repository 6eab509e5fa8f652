// CUDA kernels of the noise ops: one thread per Philox call (four normals), grid-stride
// loops with 64-bit indices so tensors past 2^31 elements are covered.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../noise.h"
#include "../common/philox.h"

namespace ddpm_fast {
namespace {

constexpr int kThreads = 256;

unsigned int grid_for(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), 65535 * 32));
}

__global__ void philox4x32_10_kernel(const uint32_t* __restrict__ in, uint32_t* __restrict__ out,
                                     int64_t calls, uint64_t key) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < calls;
       i += int64_t{gridDim.x} * blockDim.x) {
    const Philox4 w = philox4x32_10(Philox4{{in[4 * i], in[4 * i + 1], in[4 * i + 2], in[4 * i + 3]}},
                                    static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32));
#pragma unroll
    for (int j = 0; j < 4; ++j) out[4 * i + j] = w.w[j];
  }
}

__global__ void randn_kernel(float* __restrict__ out, NoiseShape shape, uint64_t seed,
                             uint32_t step, uint32_t sample_offset) {
  const int64_t calls = shape.batch * shape.quads;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < calls;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t b = i / shape.quads, q = i % shape.quads;
    const Normal4 n = normal4(seed, static_cast<uint32_t>(q), sample_offset + static_cast<uint32_t>(b), step);
    const int64_t e = 4 * q;
    float* dst = out + b * shape.per_sample + e;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (e + j < shape.per_sample) dst[j] = n.v[j];
    }
  }
}

at::Tensor philox4x32_10_cuda(const at::Tensor& counter, int64_t seed) {
  check_philox_args(counter, seed);
  const c10::cuda::CUDAGuard guard(counter.device());
  const at::Tensor c = counter.contiguous();
  at::Tensor out = at::empty_like(c);
  const int64_t calls = c.numel() / 4;
  if (calls == 0) return out;
  philox4x32_10_kernel<<<grid_for(calls), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const uint32_t*>(c.data_ptr<int32_t>()),
      reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>()), calls, static_cast<uint64_t>(seed));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void randn_cuda(const at::Tensor& out, int64_t seed, int64_t step, int64_t sample_offset) {
  const NoiseShape shape = check_randn_args(out, seed, step, sample_offset);
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t calls = shape.batch * shape.quads;
  if (calls == 0) return;
  randn_kernel<<<grid_for(calls), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      out.data_ptr<float>(), shape, static_cast<uint64_t>(seed), static_cast<uint32_t>(step),
      static_cast<uint32_t>(sample_offset));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) {
  m.impl("philox4x32_10", &philox4x32_10_cuda);
  m.impl("randn_", &randn_cuda);
}

}  // namespace ddpm_fast
