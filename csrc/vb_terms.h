// The fused per-timestep term of the variational bound (DESIGN §2.6), shared by
// csrc/cpu/vb_terms.cpp and csrc/cuda/vb_terms.cu: argument checks and the per-element
// arithmetic. For one row (B, P, Q, clip, c1, inv_sigma, kl_const, decoder; float64) and a
// sample's x_0, the noise ε that made x_t and the network output, each element gives, in double
// (a good network's out − target is small beside either: float32 would keep only a few digits)
//   d = out − (P·x_0 + Q·ε)               the output's error against its target (ε, x_0 or v)
//   x̂0 = x_0 + B·d                       = A·x_t + B·out, clipped to [−1, 1] when clip ≠ 0
//   err = x_0 − x̂0                        (−B·d where nothing is clipped: no cancellation)
// and the sample's sums Σerr², Σd² and, on the decoder row, Σ −log of the bin mass of eq. 13, whose
// normal tails are float32 functions (stable: no 1 − 1, no underflow).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>

#include "diffusion_step.h"

namespace ddpm_fast {

struct TermCoefs {
  double B, P, Q, clip, c1, inv_sigma, kl_const, decoder;
};

// A row of the [T, kTermColumns] table, in contract.TERM_COLUMNS order.
DDPM_FAST_HD TermCoefs term_row(const double* row) {
  return {row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7]};
}

// One element's (err, d) of the header comment, the clip a compile-time flag (the CPU's dense loop
// then has no branch and vectorises) or, below, the row's.
template <bool kClip>
DDPM_FAST_HD void term_errors_with(const TermCoefs& k, double x0, double noise, double out, double& err, double& d) {
  d = out - (k.P * x0 + k.Q * noise);
  err = -k.B * d;
  if constexpr (kClip) {
    const double x0_hat = x0 + k.B * d;
    err = x0_hat < -1.0 ? x0 + 1.0 : err;  // comparisons: a NaN x̂0 keeps err NaN
    err = x0_hat > 1.0 ? x0 - 1.0 : err;
  }
}

DDPM_FAST_HD void term_errors(const TermCoefs& k, double x0, double noise, double out, double& err, double& d) {
  if (k.clip != 0.0) {
    term_errors_with<true>(k, x0, noise, out, err, d);
  } else {
    term_errors_with<false>(k, x0, noise, out, err, d);
  }
}

// log(erfc(x)) for x ≥ 0 from Numerical Recipes' erfcc (fractional error < 1.2e-7 everywhere), kept
// in log form so that it never underflows: erfc(x) = t·exp(−x² + P(t)), t = 1/(1 + x/2).
DDPM_FAST_HD float log_erfc_nonneg(float x) {
  const float t = 1.0f / (1.0f + 0.5f * x);
  const float p =
      -1.26551223f +
      t * (1.00002368f +
           t * (0.37409196f +
                t * (0.09678418f +
                     t * (-0.18628806f +
                          t * (0.27886807f + t * (-1.13520398f + t * (1.48851587f + t * (-0.82215223f + t * 0.17087277f))))))));
  return logf(t) - x * x + p;
}

// log(1 + y) and exp(x) − 1 accurate near 0 (Kahan's corrections), from log and exp alone.
DDPM_FAST_HD float log1p_accurate(float y) {
  const float w = 1.0f + y;
  return w == 1.0f ? y : logf(w) * (y / (w - 1.0f));
}

DDPM_FAST_HD float expm1_accurate(float x) {
  const float u = expf(x);
  if (u == 1.0f) return x;
  const float um1 = u - 1.0f;
  return um1 == -1.0f ? -1.0f : um1 * (x / logf(u));
}

constexpr float kInvSqrt2 = 0.70710678118654752f;

// log Q(z), Q the standard normal's upper tail 1 − Φ(z) = erfc(z/√2)/2, for any z without underflow.
DDPM_FAST_HD float log_normal_tail(float z) {
  const float a = fabsf(z) * kInvSqrt2;
  const float log_small = log_erfc_nonneg(a) - 0.69314718055994531f;  // log Q(|z|) ≤ log ½
  return z >= 0.0f ? log_small : log1p_accurate(-expf(log_small));
}

// erf(a) for a ≥ 0 with a small relative error near 0 (its Taylor series below ½, where 1 − erfc cancels).
DDPM_FAST_HD float erf_nonneg(float a) {
  if (a >= 0.5f) return 1.0f - expf(log_erfc_nonneg(a));
  const float s = a * a;
  const float series =
      1.0f - s * (1.0f / 3.0f - s * (1.0f / 10.0f - s * (1.0f / 42.0f - s * (1.0f / 216.0f - s * (1.0f / 1320.0f)))));
  return 1.12837916709551257f * a * series;  // 2/√π
}

// log of the mass N(0, 1) gives to [lo, hi] (lo < hi, either may be infinite): from the tail on the
// bin's side of the mean, or as a sum of two erf where the bin holds the mean, never 1 − 1.
DDPM_FAST_HD float log_normal_mass(float lo, float hi) {
  if (hi <= 0.0f) {  // mirror the bin to the upper side
    const float flipped = -lo;
    lo = -hi;
    hi = flipped;
  }
  if (lo >= 0.0f) {
    const float log_lo = log_normal_tail(lo);
    return hi == INFINITY ? log_lo : log_lo + logf(-expm1_accurate(log_normal_tail(hi) - log_lo));
  }
  const float below = lo == -INFINITY ? 1.0f : erf_nonneg(-lo * kInvSqrt2);
  const float above = hi == INFINITY ? 1.0f : erf_nonneg(hi * kInvSqrt2);
  return logf(0.5f * (below + above));
}

// −log p_θ(x_0 | x_1) of one element (eq. 13): the bin of x_0 (edge bins extended to ±∞) under
// N(μ, σ_1²), with x_0 − μ = c1·err.
DDPM_FAST_HD float decoder_nll(const TermCoefs& k, float x0, double err) {
  const double u = k.c1 * err;
  const float lo = x0 < -kEdgeBin ? -INFINITY : static_cast<float>((u - kBinHalfWidth) * k.inv_sigma);
  const float hi = x0 > kEdgeBin ? INFINITY : static_cast<float>((u + kBinHalfWidth) * k.inv_sigma);
  return -log_normal_mass(lo, hi);
}

// Per-sample sums (Σerr², Σd², Σ decoder NLL) to the sample's three outputs: the term in nats
// (the decoder's NLL, or the KL of eqs. 6–7, D·kl_const + ½(c1·inv_sigma)²·Σerr²), Σerr², Σd².
DDPM_FAST_HD void term_outputs(const TermCoefs& k, int64_t per_sample, double sse, double sqe, double nll,
                               double* result) {
  const double scale = k.c1 * k.inv_sigma;
  result[0] = k.decoder != 0.0 ? nll : per_sample * k.kl_const + 0.5 * scale * scale * sse;
  result[1] = sse;
  result[2] = sqe;
}

// Checks shared by the kernels; returns the elements per sample.
inline int64_t check_vb_terms_args(const at::Tensor& x0, const at::Tensor& noise, const at::Tensor& out,
                                   const at::Tensor& row) {
  constexpr const char* op = "ddpm_fast::vb_terms";
  TORCH_CHECK(x0.scalar_type() == at::kFloat && noise.scalar_type() == at::kFloat, op,
              ": x_start and noise must be float32, got ", x0.scalar_type(), " and ", noise.scalar_type());
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kHalf || out.scalar_type() == at::kBFloat16,
              op, ": model_output must be float32, float16 or bfloat16, got ", out.scalar_type());
  TORCH_CHECK(x0.dim() >= 1 && noise.sizes() == x0.sizes() && out.sizes() == x0.sizes(), op,
              ": noise and model_output must have x_start's shape ", x0.sizes(), ", got ", noise.sizes(), " and ",
              out.sizes());
  TORCH_CHECK(x0.dim() == 4 || (x0.is_contiguous() && noise.is_contiguous() && out.is_contiguous()), op,
              ": tensors that are not 4-D must be contiguous");
  TORCH_CHECK(row.scalar_type() == at::kDouble && row.dim() == 1 && row.size(0) == kTermColumns && row.is_contiguous(),
              op, ": row must be a contiguous float64 [", kTermColumns, "] tensor, got ", row.scalar_type(), " ",
              row.sizes());
  for (const at::Tensor* t : {&noise, &out, &row}) {
    TORCH_CHECK(t->device() == x0.device(), op, ": every tensor must be on x_start's device ", x0.device(),
                ", got one on ", t->device());
  }
  return x0.size(0) == 0 ? 0 : x0.numel() / x0.size(0);
}

}  // namespace ddpm_fast
