// CPU kernel of the fused sampling update: the noise of a chunk of a sample (normal_quads.h,
// AVX2 where available) then the update of that chunk, at::parallel_for (OpenMP) over chunks.
#include <ATen/Dispatch.h>
#include <torch/library.h>


#include "../diffusion_step.h"
#include "common/loops.h"
#include "common/normal_quads.h"

namespace ddpm_fast {
namespace {

// The optional inputs of one update, each nullptr when absent (DESIGN §2.5 for the guidance ones,
// §2.3 for the learned variance).
template <typename out_t>
struct Extras {
  float* history;
  const out_t* uncond;  // out's offsets
  const float* grad;    // x's offsets
  const out_t* var;     // out's offsets
};

// One element of a learned row (its variance read at out's offset) or of any other (std 1).
template <typename out_t>
float update_at(const StepCoefs& k, float* x, const out_t* out, const Extras<out_t>& extra, int64_t ox, int64_t oo,
                float z) {
  float o = static_cast<float>(out[oo]);
  if (extra.uncond != nullptr) o = cfg_output(k, o, static_cast<float>(extra.uncond[oo]));
  const float std = extra.var == nullptr ? 1.0f : learned_std(k, static_cast<float>(extra.var[oo]));
  return step_update(k, x[ox], o, extra.grad == nullptr ? 0.0f : extra.grad[ox], z,
                     extra.history == nullptr ? nullptr : extra.history + ox, std);
}

// A contiguous run of n elements, at offset ox of x (and of history and grad) and oo of out (and of
// uncond and var), one loop per combination of the optional inputs (compile-time flags): no
// per-element test of an absent input, so each loop without a learned variance vectorises.
template <typename out_t, bool kHistory, bool kUncond, bool kGrad, bool kVar>
void contiguous_run(const StepCoefs& k, float* __restrict__ xs, const out_t* __restrict__ os,
                    const Extras<out_t>& extra, int64_t ox, int64_t oo, const float* __restrict__ z, int64_t n) {
  float* __restrict__ hs = kHistory ? extra.history + ox : nullptr;
  const out_t* __restrict__ us = kUncond ? extra.uncond + oo : nullptr;
  const float* __restrict__ gs = kGrad ? extra.grad + ox : nullptr;
  const out_t* __restrict__ vs = kVar ? extra.var + oo : nullptr;
  for (int64_t j = 0; j < n; ++j) {
    float o = static_cast<float>(os[j]);
    if constexpr (kUncond) o = cfg_output(k, o, static_cast<float>(us[j]));
    xs[j] = step_update(k, xs[j], o, kGrad ? gs[j] : 0.0f, z[j], kHistory ? hs + j : nullptr,
                        kVar ? learned_std(k, static_cast<float>(vs[j])) : 1.0f);
  }
}

template <typename out_t>
void step_kernel(float* x, const out_t* out, const Extras<out_t>& extra, const Layout4d& lx, const Layout4d& lo,
                 const NoiseShape& shape, const StepCoefs& k, uint64_t seed, uint32_t key, uint32_t sample_offset) {
  const bool dense = samples_are_dense(lx) && samples_are_dense(lo);
  // a fixed row ignores the variance channels: its loops are those of a call without them
  const bool learned = extra.var != nullptr && k.learned != 0.0f;
  for_each_noise_chunk(shape, seed, key, sample_offset, [&](int64_t b, int64_t e0, const float* z, int64_t n) {
    if (dense) {
      const int64_t ox = b * lx.stride_b + e0, oo = b * lo.stride_b + e0;
      with_flag(extra.history != nullptr, [&](auto history) {
        with_flag(extra.uncond != nullptr, [&](auto uncond) {
          with_flag(extra.grad != nullptr, [&](auto grad) {
            with_flag(learned, [&](auto var) {
              contiguous_run<out_t, decltype(history)::value, decltype(uncond)::value, decltype(grad)::value,
                             decltype(var)::value>(k, x + ox, out + oo, extra, ox, oo, z, n);
            });
          });
        });
      });
    } else {
      Extras<out_t> used = extra;
      if (!learned) used.var = nullptr;
      for (int64_t j = 0; j < n; ++j) {
        x[lx.offset(b, e0 + j)] = update_at(k, x, out, used, lx.offset(b, e0 + j), lo.offset(b, e0 + j), z[j]);
      }
    }
  });
}

void diffusion_step_cpu(const at::Tensor& x, const at::Tensor& out, const at::Tensor& coefs,
                        const at::Tensor& noise_keys, const at::Tensor& step_index, int64_t seed,
                        int64_t sample_offset, const std::optional<at::Tensor>& history,
                        const std::optional<at::Tensor>& uncond, const std::optional<at::Tensor>& grad,
                        const std::optional<at::Tensor>& var) {
  const NoiseShape shape =
      check_step_args(x, out, coefs, noise_keys, step_index, seed, sample_offset, history, uncond, grad, var);
  TORCH_CHECK(x.device().is_cpu(), "ddpm_fast::diffusion_step_ (CPU kernel): x on ", x.device());
  const int64_t index = step_index.data_ptr<int64_t>()[0];
  TORCH_CHECK(index >= 0 && index < coefs.size(0), "ddpm_fast::diffusion_step_: step index ", index,
              " is outside the table of ", coefs.size(0), " rows");
  const StepCoefs k = step_row(coefs.data_ptr<float>() + index * kStepColumns);
  TORCH_CHECK(k.learned == 0.0f || var.has_value(), "ddpm_fast::diffusion_step_: row ", index,
              " is a learned-variance row (learned = ", k.learned, "): pass variance_output");
  const int64_t key = noise_keys.data_ptr<int64_t>()[index];
  TORCH_CHECK(key >= 0 && key < kUint32Range, "ddpm_fast::diffusion_step_: noise key ", key,
              " is outside [0, 2^32)");
  if (shape.batch == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "diffusion_step_cpu", [&] {
    const Extras<scalar_t> extra{history.has_value() ? history->data_ptr<float>() : nullptr,
                                 uncond.has_value() ? uncond->data_ptr<scalar_t>() : nullptr,
                                 grad.has_value() ? grad->data_ptr<float>() : nullptr,
                                 var.has_value() ? var->data_ptr<scalar_t>() : nullptr};
    step_kernel<scalar_t>(x.data_ptr<float>(), out.data_ptr<scalar_t>(), extra, layout_of(x), layout_of(out), shape, k,
                          static_cast<uint64_t>(seed), static_cast<uint32_t>(key),
                          static_cast<uint32_t>(sample_offset));
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) {
  m.impl("diffusion_step_", &diffusion_step_cpu);
}

}  // namespace ddpm_fast
