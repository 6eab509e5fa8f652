// The CUDA kernel body of the fused sampling update, for nvcc (csrc/cuda/diffusion_step.cu) and
// the host emulator (csrc/emulator/, DESIGN §5.6): one thread per Philox call (four consecutive
// logical elements of a sample), grid-stride loop with 64-bit offsets. The coefficient row is read
// at a step index held in device memory, so the launch never needs the host and a whole sampling
// step can be captured in a CUDA graph. An index outside the table (which no host check can see
// without a sync) writes NaN, so the sampler's finite check catches it; so does a learned-variance row
// (DESIGN §2.3) launched without the variance channels.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <limits>
#include <optional>

#include "../common/grid.h"
#include "../diffusion_step.h"

namespace ddpm_fast {

constexpr int kStepThreads = 256;

// The kernel's parameters are __restrict__ (csrc/cuda/diffusion_step.cu), which nvcc carries into this
// inlined body: the SASS is that of the body written inside the kernel (read-only loads through the
// non-coherent cache). Restrict on the members of one struct parameter is lost, so there is none.
template <typename out_t, class Thread>
DDPM_FAST_DEVICE void step_body(const Thread& t, float* __restrict__ x, const out_t* __restrict__ out,
                                float* __restrict__ history, const out_t* __restrict__ uncond,
                                const float* __restrict__ grad, const out_t* __restrict__ var, const Layout4d& lx,
                                const Layout4d& lo,
                                const NoiseShape& shape, const float* __restrict__ coefs,
                                const int64_t* __restrict__ keys, const int64_t* __restrict__ step_index,
                                int64_t rows, uint64_t seed, uint32_t sample_offset) {
  const int64_t index = *step_index;
  bool valid = index >= 0 && index < rows;
  StepCoefs k{};
  uint32_t key = 0;
  if (valid) {
    k = step_row(coefs + index * kStepColumns);
    key = static_cast<uint32_t>(keys[index]);
    valid = k.learned == 0.0f || var != nullptr;
  }
  const bool learned = var != nullptr && k.learned != 0.0f;  // a fixed row ignores the variance channels
  const int64_t calls = shape.batch * shape.quads;
  for (int64_t i = t.block() * int64_t{t.threads()} + t.thread(); i < calls; i += int64_t{t.blocks()} * t.threads()) {
    const int64_t b = i / shape.quads, q = i % shape.quads;
    const Normal4 z = normal4(seed, static_cast<uint32_t>(q), sample_offset + static_cast<uint32_t>(b), key);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t e = 4 * q + j;
      if (e < shape.per_sample) {
        const int64_t ox = lx.offset(b, e), oo = lo.offset(b, e);
        float o = static_cast<float>(out[oo]);
        if (uncond != nullptr) o = cfg_output(k, o, static_cast<float>(uncond[oo]));
        const float std = learned ? learned_std(k, static_cast<float>(var[oo])) : 1.0f;
        x[ox] = valid ? step_update(k, x[ox], o, grad == nullptr ? 0.0f : grad[ox], z.v[j],
                                    history == nullptr ? nullptr : history + ox, std)
                      : std::numeric_limits<float>::quiet_NaN();
      }
    }
  }
}

// The op's host side (checks, the kernel's arguments) around a launch, so that the CUDA launcher and
// the emulator run the same: launch(out_t{}, blocks, args…) must run step_body over args….
template <class Launch>
void run_diffusion_step_(const at::Tensor& x, const at::Tensor& out, const at::Tensor& coefs,
                         const at::Tensor& noise_keys, const at::Tensor& step_index, int64_t seed,
                         int64_t sample_offset, const std::optional<at::Tensor>& history,
                         const std::optional<at::Tensor>& uncond, const std::optional<at::Tensor>& grad,
                         const std::optional<at::Tensor>& var, Launch&& launch) {
  const NoiseShape shape =
      check_step_args(x, out, coefs, noise_keys, step_index, seed, sample_offset, history, uncond, grad, var);
  const int64_t calls = shape.batch * shape.quads;
  if (calls == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "diffusion_step_", [&] {
    launch(scalar_t{}, grid_stride_blocks(calls, kStepThreads), x.data_ptr<float>(), out.data_ptr<scalar_t>(),
           history.has_value() ? history->data_ptr<float>() : nullptr,
           uncond.has_value() ? uncond->data_ptr<scalar_t>() : nullptr,
           grad.has_value() ? grad->data_ptr<float>() : nullptr, var.has_value() ? var->data_ptr<scalar_t>() : nullptr,
           layout_of(x), layout_of(out), shape,
           coefs.data_ptr<float>(), noise_keys.data_ptr<int64_t>(), step_index.data_ptr<int64_t>(), coefs.size(0),
           static_cast<uint64_t>(seed), static_cast<uint32_t>(sample_offset));
  });
}

}  // namespace ddpm_fast
