// CPU kernel of the bound's per-timestep term (DESIGN §2.6): at::parallel_for over samples, each
// sample's sums in double in an order fixed by its size, so a sample's result never depends on the
// batch or the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <type_traits>


#include "../vb_terms.h"
#include "common/loops.h"

namespace ddpm_fast {
namespace {

// A KL row of a dense sample with a float32 output: no transcendental function, a few multiply-adds an
// element, so one loop that OpenMP's simd reduction vectorises (its order of summation is fixed by the
// sample's size), compiled for several targets.
template <bool kClip>
__attribute__((always_inline)) inline void dense_kl_loop(const TermCoefs& k, const float* __restrict__ x0, const float* __restrict__ noise,
                   const float* __restrict__ out, int64_t n, double& sse_total, double& sqe_total) {
  double sse = 0.0, sqe = 0.0;
#pragma omp simd reduction(+ : sse, sqe)
  for (int64_t e = 0; e < n; ++e) {
    double err, d;
    term_errors_with<kClip>(k, x0[e], noise[e], out[e], err, d);
    sse += err * err;
    sqe += d * d;
  }
  sse_total = sse;
  sqe_total = sqe;
}

DDPM_FAST_VECTOR_CLONES void dense_kl_sums(const TermCoefs& k, const float* x0, const float* noise, const float* out,
                                           int64_t n, double& sse, double& sqe) {
  if (k.clip != 0.0) {
    dense_kl_loop<true>(k, x0, noise, out, n, sse, sqe);
  } else {
    dense_kl_loop<false>(k, x0, noise, out, n, sse, sqe);
  }
}

// Any layout, or the decoder row (its normal tails branch): one element after another.
template <typename out_t, bool kContiguous, bool kDecoder>
void sample_sums(const TermCoefs& k, const float* x0, const float* noise, const out_t* out, const Layout4d& lx,
                 const Layout4d& ln, const Layout4d& lo, int64_t b, int64_t per_sample, double* result) {
  double sse = 0.0, sqe = 0.0, nll = 0.0;
  if constexpr (kContiguous && !kDecoder && std::is_same_v<out_t, float>) {
    const int64_t first = b * per_sample;
    dense_kl_sums(k, x0 + first, noise + first, out + first, per_sample, sse, sqe);
  } else {
    for (int64_t e = 0; e < per_sample; ++e) {
      const int64_t ox = kContiguous ? b * per_sample + e : lx.offset(b, e);
      const int64_t on = kContiguous ? ox : ln.offset(b, e);
      const int64_t oo = kContiguous ? ox : lo.offset(b, e);
      double err, d;
      term_errors(k, x0[ox], noise[on], static_cast<float>(out[oo]), err, d);
      sse += err * err;
      sqe += d * d;
      if constexpr (kDecoder) nll += decoder_nll(k, x0[ox], err);
    }
  }
  term_outputs(k, per_sample, sse, sqe, nll, result);
}

at::Tensor vb_terms_cpu(const at::Tensor& x0, const at::Tensor& noise, const at::Tensor& out, const at::Tensor& row) {
  const int64_t per_sample = check_vb_terms_args(x0, noise, out, row);
  TORCH_CHECK(x0.device().is_cpu(), "ddpm_fast::vb_terms (CPU kernel): x_start on ", x0.device());
  const int64_t batch = x0.size(0);
  at::Tensor result = at::empty({batch, 3}, x0.options().dtype(at::kDouble));
  const TermCoefs k = term_row(row.data_ptr<double>());
  const Layout4d lx = layout_of(x0), ln = layout_of(noise), lo = layout_of(out);
  const bool contiguous = is_nchw_contiguous(lx, per_sample) && is_nchw_contiguous(ln, per_sample) &&
                          is_nchw_contiguous(lo, per_sample);
  double* results = result.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "vb_terms_cpu", [&] {
    const float* xs = x0.data_ptr<float>();
    const float* ns = noise.data_ptr<float>();
    const scalar_t* os = out.data_ptr<scalar_t>();
    with_flag(contiguous, [&](auto kContiguous) {
      with_flag(k.decoder != 0.0, [&](auto kDecoder) {
        at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
          for (int64_t b = begin; b < end; ++b) {
            sample_sums<scalar_t, decltype(kContiguous)::value, decltype(kDecoder)::value>(
                k, xs, ns, os, lx, ln, lo, b, per_sample, results + 3 * b);
          }
        });
      });
    });
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) {
  m.impl("vb_terms", &vb_terms_cpu);
}

}  // namespace ddpm_fast
