// CPU kernel of the bound's per-timestep term (DESIGN §2.6): at::parallel_for over samples, each
// sample's sums in double in a fixed order, so a sample's result never depends on the batch or
// the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>


#include "../vb_terms.h"
#include "common/loops.h"

namespace ddpm_fast {
namespace {

// kLanes partial sums a quantity (element e in lane e mod kLanes), added up in a fixed order at the end:
// the lanes let the compiler vectorise the sums, which a single accumulator would serialise.
constexpr int64_t kLanes = 8;

// Compile-time flags for the NCHW-contiguous case and the decoder row, so that the common loop
// (contiguous, a KL row: a few multiply-adds an element) vectorises.
template <typename out_t, bool kContiguous, bool kDecoder>
void sample_sums(const TermCoefs& k, const float* x0, const float* noise, const out_t* out, const Layout4d& lx,
                 const Layout4d& ln, const Layout4d& lo, int64_t b, int64_t per_sample, double* result) {
  double sse[kLanes] = {}, sqe[kLanes] = {}, nll[kLanes] = {};
  const auto add = [&](int64_t e, int64_t lane) {
    const int64_t ox = kContiguous ? b * per_sample + e : lx.offset(b, e);
    const int64_t on = kContiguous ? ox : ln.offset(b, e);
    const int64_t oo = kContiguous ? ox : lo.offset(b, e);
    double err, d;
    term_errors(k, x0[ox], noise[on], static_cast<float>(out[oo]), err, d);
    sse[lane] += err * err;
    sqe[lane] += d * d;
    if constexpr (kDecoder) nll[lane] += decoder_nll(k, x0[ox], err);
  };
  const int64_t whole = per_sample - per_sample % kLanes;
  for (int64_t e = 0; e < whole; e += kLanes) {
    for (int64_t lane = 0; lane < kLanes; ++lane) add(e + lane, lane);
  }
  for (int64_t e = whole; e < per_sample; ++e) add(e, e - whole);
  for (int64_t lane = 1; lane < kLanes; ++lane) {
    sse[0] += sse[lane];
    sqe[0] += sqe[lane];
    nll[0] += nll[lane];
  }
  term_outputs(k, per_sample, sse[0], sqe[0], nll[0], result);
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
