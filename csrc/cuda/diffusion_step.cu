// CUDA kernel of the fused sampling update: one thread per Philox call (four consecutive
// logical elements of a sample), grid-stride loop with 64-bit offsets. The coefficient row
// is read at a step index held in device memory, so the launch never needs the host and a
// whole sampling step can be captured in a CUDA graph. An index outside the table (which no
// host check can see without a sync) writes NaN, so the sampler's finite check catches it.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../diffusion_step.h"

namespace ddpm_fast {
namespace {

constexpr int kThreads = 256;

template <typename out_t>
__global__ void step_kernel(float* __restrict__ x, const out_t* __restrict__ out, float* __restrict__ history,
                            const out_t* __restrict__ uncond, const float* __restrict__ grad, Layout4d lx, Layout4d lo,
                            NoiseShape shape, const float* __restrict__ coefs, const int64_t* __restrict__ keys,
                            const int64_t* __restrict__ step_index, int64_t rows, uint64_t seed,
                            uint32_t sample_offset) {
  const int64_t index = *step_index;
  const bool valid = index >= 0 && index < rows;
  StepCoefs k{};
  uint32_t key = 0;
  if (valid) {
    k = step_row(coefs + index * kStepColumns);
    key = static_cast<uint32_t>(keys[index]);
  }
  const int64_t calls = shape.batch * shape.quads;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < calls;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t b = i / shape.quads, q = i % shape.quads;
    const Normal4 z = normal4(seed, static_cast<uint32_t>(q), sample_offset + static_cast<uint32_t>(b), key);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t e = 4 * q + j;
      if (e < shape.per_sample) {
        const int64_t ox = lx.offset(b, e), oo = lo.offset(b, e);
        float o = static_cast<float>(out[oo]);
        if (uncond != nullptr) o = cfg_output(k, o, static_cast<float>(uncond[oo]));
        x[ox] = valid ? step_update(k, x[ox], o, grad == nullptr ? 0.0f : grad[ox], z.v[j],
                                    history == nullptr ? nullptr : history + ox)
                      : std::numeric_limits<float>::quiet_NaN();
      }
    }
  }
}

void diffusion_step_cuda(const at::Tensor& x, const at::Tensor& out, const at::Tensor& coefs,
                         const at::Tensor& noise_keys, const at::Tensor& step_index, int64_t seed,
                         int64_t sample_offset, const std::optional<at::Tensor>& history,
                         const std::optional<at::Tensor>& uncond, const std::optional<at::Tensor>& grad) {
  const NoiseShape shape =
      check_step_args(x, out, coefs, noise_keys, step_index, seed, sample_offset, history, uncond, grad);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t calls = shape.batch * shape.quads;
  if (calls == 0) return;
  const auto blocks = static_cast<unsigned int>(std::min<int64_t>((calls + kThreads - 1) / kThreads, 65535 * 32));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "diffusion_step_cuda", [&] {
    step_kernel<scalar_t><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<float>(), out.data_ptr<scalar_t>(), history.has_value() ? history->data_ptr<float>() : nullptr,
        uncond.has_value() ? uncond->data_ptr<scalar_t>() : nullptr,
        grad.has_value() ? grad->data_ptr<float>() : nullptr, layout_of(x), layout_of(out), shape,
        coefs.data_ptr<float>(), noise_keys.data_ptr<int64_t>(), step_index.data_ptr<int64_t>(), coefs.size(0),
        static_cast<uint64_t>(seed), static_cast<uint32_t>(sample_offset));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) {
  m.impl("diffusion_step_", &diffusion_step_cuda);
}

}  // namespace ddpm_fast
