// The fused sampling update (DESIGN §2), shared by csrc/cpu/diffusion_step.cpp and
// csrc/cuda/diffusion_step.cu: argument checks, the strided layout of x and the network
// output, and the per-element arithmetic.
//   out ← out + w·(out − uncond) + Gout·g;  x̂0 = A·x + B·out (clipped to [−1, 1] when clip ≠ 0);
//   x ← C·x̂0 + D·x + E·out + H·x̂0' + Gmean·Σ·g + σ·√Σ·z
// with x̂0' the previous row's x̂0, read from the optional history buffer, which then takes x̂0
// (multistep solvers, DESIGN §2.4), and the guidance inputs of DESIGN §2.5: the unconditional
// network output `uncond` and a classifier's gradient g. Each optional input's term is absent
// without it. Σ is 1, or on a learned row (DESIGN §2.3) the variance the network outputs in its
// second C channels (the optional `var`), per element.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>

#include "common/philox.h"
#include "noise.h"

namespace ddpm_fast {

// Offsets of a [B, C, H, W] tensor's elements, addressed by (sample, logical NCHW index e).
struct Layout4d {
  int64_t channels, height, width;
  int64_t stride_b, stride_c, stride_h, stride_w;

  DDPM_FAST_HD int64_t offset(int64_t b, int64_t e) const {
    const int64_t hw = height * width;
    const int64_t c = e / hw, rest = e - c * hw;
    const int64_t h = rest / width, w = rest - h * width;
    return b * stride_b + c * stride_c + h * stride_h + w * stride_w;
  }
};

// Tensors of any rank are seen as [B, C, H, W]; ranks other than 4 must be contiguous.
inline Layout4d layout_of(const at::Tensor& t) {
  if (t.dim() == 4) {
    return {t.size(1), t.size(2), t.size(3), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
  }
  const int64_t per = t.size(0) == 0 ? 0 : t.numel() / t.size(0);
  return {per, 1, 1, per, 1, 1, 1};
}

struct StepCoefs {
  float A, B, C, D, E, sigma, clip, H, w, Gout, Gmean, learned, log_beta, log_beta_tilde;
};

// A row of the [S, kStepColumns] table, in contract.STEP_COLUMNS order.
DDPM_FAST_HD StepCoefs step_row(const float* row) {
  return {row[0], row[1], row[2], row[3], row[4],  row[5],  row[6],
          row[7], row[8], row[9], row[10], row[11], row[12], row[13]};
}

// √Σ_θ of a learned row from the network's variance channel v: Σ_θ = exp(log Σ_θ) with
// log Σ_θ = frac·log β_t + (1 − frac)·log β̃_t, frac = (v + 1)/2 ("learned_range", Nichol & Dhariwal
// 2021 eq. 15, β̃_t clipped on the last row), or log Σ_θ = v ("learned"). Taken as exp(½·log Σ_θ),
// as improved-diffusion draws its noise.
DDPM_FAST_HD float learned_std(const StepCoefs& k, float v) {
  const float frac = (v + 1.0f) / 2.0f;
  const float log_variance = k.learned == kLearnedLog ? v : frac * k.log_beta + (1.0f - frac) * k.log_beta_tilde;
  return expf(0.5f * log_variance);
}

DDPM_FAST_HD float estimate_x0(const StepCoefs& k, float x, float out) {
  float x0_hat = k.A * x + k.B * out;
  if (k.clip != 0.0f) {  // comparisons, not fminf/fmaxf: a NaN stays NaN for the finite check
    x0_hat = x0_hat < -1.0f ? -1.0f : x0_hat;
    x0_hat = x0_hat > 1.0f ? 1.0f : x0_hat;
  }
  return x0_hat;
}

// Classifier-free guidance, ε̃ = (1 + w)·ε(x, y) − w·ε(x, ∅) (Ho & Salimans 2022, eq. 6), written
// so that w = 0 returns the conditional output exactly.
DDPM_FAST_HD float cfg_output(const StepCoefs& k, float out, float uncond) { return out + k.w * (out - uncond); }

// One element's update from the network output `out` (already combined by cfg_output under
// classifier-free guidance) and the classifier gradient g (0 without a classifier, which leaves
// every value as it would be without the two terms); with a history pointer its element (x̂0')
// is read, then replaced by x̂0. std: √Σ of a learned row (learned_std), 1 on any other, where
// the products below are then exactly those of the row's own σ and Gmean.
DDPM_FAST_HD float step_update(const StepCoefs& k, float x, float out, float g, float z, float* history,
                               float std = 1.0f) {
  out += k.Gout * g;  // ε̂ = ε − s·√(1−ᾱ_t)·g in the output's own parametrisation (DESIGN §2.5)
  const float x0_hat = estimate_x0(k, x, out);
  float x_prev = k.C * x0_hat + k.D * x + k.E * out + k.Gmean * (std * std) * g + k.sigma * std * z;
  if (history != nullptr) {
    x_prev += k.H * *history;
    *history = x0_hat;
  }
  return x_prev;
}

inline NoiseShape check_step_args(const at::Tensor& x, const at::Tensor& out, const at::Tensor& coefs,
                                  const at::Tensor& noise_keys, const at::Tensor& step_index,
                                  int64_t seed, int64_t sample_offset,
                                  const std::optional<at::Tensor>& history,
                                  const std::optional<at::Tensor>& uncond,
                                  const std::optional<at::Tensor>& grad,
                                  const std::optional<at::Tensor>& var) {
  constexpr const char* op = "ddpm_fast::diffusion_step_";
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": x must be float32, got ", x.scalar_type());
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kHalf ||
                  out.scalar_type() == at::kBFloat16,
              op, ": model_output must be float32, float16 or bfloat16, got ", out.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && out.sizes() == x.sizes(), op, ": model_output must have x's shape ",
              x.sizes(), ", got ", out.sizes());
  TORCH_CHECK(x.dim() == 4 || (x.is_contiguous() && out.is_contiguous()), op,
              ": tensors that are not 4-D must be contiguous");
  TORCH_CHECK(coefs.scalar_type() == at::kFloat && coefs.dim() == 2 && coefs.size(1) == kStepColumns &&
                  coefs.is_contiguous(),
              op, ": coefs must be a contiguous float32 [S, ", kStepColumns, "] table, got ",
              coefs.scalar_type(), " ", coefs.sizes());
  TORCH_CHECK(noise_keys.scalar_type() == at::kLong && noise_keys.dim() == 1 &&
                  noise_keys.size(0) == coefs.size(0) && noise_keys.is_contiguous(),
              op, ": noise_keys must be a contiguous int64 [S] tensor with S = ", coefs.size(0));
  TORCH_CHECK(step_index.scalar_type() == at::kLong && step_index.numel() == 1, op,
              ": step_index must be a one-element int64 tensor");
  for (const at::Tensor* t : {&out, &coefs, &noise_keys, &step_index}) {
    TORCH_CHECK(t->device() == x.device(), op, ": every tensor must be on x's device ", x.device(),
                ", got one on ", t->device());
  }
  // x is updated in place: no element of it may share memory with another, nor with an
  // element of out other than its own (ATen's checks, as for its own in-place ops)
  at::assert_no_internal_overlap(x);
  at::assert_no_partial_overlap(x, out);
  // the optional inputs, addressed with the offsets of x (history, grad) or of out (uncond); history
  // is written in place like x, so it may share memory with no other tensor
  const auto companion = [&](const std::optional<at::Tensor>& t, const char* name, const at::Tensor& like,
                             const char* like_name) {
    if (!t.has_value()) return;
    TORCH_CHECK(t->scalar_type() == like.scalar_type() && t->sizes() == like.sizes() && t->strides() == like.strides(),
                op, ": ", name, " must have ", like_name, "'s dtype ", like.scalar_type(), ", shape ", like.sizes(),
                " and strides ", like.strides(), ", got ", t->scalar_type(), " ", t->sizes(), " strides ", t->strides());
    TORCH_CHECK(t->device() == x.device(), op, ": ", name, " is on ", t->device(), " but x is on ", x.device());
    at::assert_no_overlap(*t, x);
  };
  companion(history, "history", x, "x");
  companion(uncond, "uncond_output", out, "model_output");
  companion(grad, "guidance_grad", x, "x");
  companion(var, "variance_output", out, "model_output");
  TORCH_CHECK(!(history.has_value() && var.has_value()), op,
              ": history (multistep rows) and variance_output (learned-variance DDPM rows) never meet in one table: "
              "pass one of them");
  if (history.has_value()) {
    for (const std::optional<at::Tensor>* other : {&uncond, &grad}) {
      if (other->has_value()) at::assert_no_overlap(*history, **other);
    }
    at::assert_no_overlap(*history, out);
  }
  check_seed(op, seed);
  const int64_t batch = x.size(0);
  TORCH_CHECK(sample_offset >= 0 && sample_offset + batch <= kUint32Range, op,
              ": sample indices must lie in [0, 2^32)");
  const int64_t per_sample = batch == 0 ? 0 : x.numel() / batch;
  const int64_t quads = (per_sample + 3) / 4;
  TORCH_CHECK(quads <= kUint32Range, op, ": at most 2^34 elements per sample, got ", per_sample);
  return {batch, per_sample, quads};
}

}  // namespace ddpm_fast
