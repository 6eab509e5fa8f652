// CUDA kernel of the bound's per-timestep term (DESIGN §2.6): one block per sample, each thread's
// sums in double over a strided share of the sample's elements, then a tree reduction in shared
// memory in a fixed order, so a sample's result never depends on the batch. The row is read from
// device memory, so a launch needs nothing from the host.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../vb_terms.h"

namespace ddpm_fast {
namespace {

constexpr int kThreads = 256;

template <typename out_t>
__global__ void vb_terms_kernel(const float* __restrict__ x0, const float* __restrict__ noise,
                                const out_t* __restrict__ out, const double* __restrict__ row, Layout4d lx, Layout4d ln,
                                Layout4d lo, int64_t per_sample, double* __restrict__ result) {
  __shared__ double sums[3][kThreads];
  const TermCoefs k = term_row(row);
  const int64_t b = blockIdx.x;
  double sse = 0.0, sqe = 0.0, nll = 0.0;
  for (int64_t e = threadIdx.x; e < per_sample; e += kThreads) {
    const float x = x0[lx.offset(b, e)];
    double err, d;
    term_errors(k, x, noise[ln.offset(b, e)], static_cast<float>(out[lo.offset(b, e)]), err, d);
    sse += err * err;
    sqe += d * d;
    if (k.decoder != 0.0) nll += decoder_nll(k, x, err);
  }
  sums[0][threadIdx.x] = sse;
  sums[1][threadIdx.x] = sqe;
  sums[2][threadIdx.x] = nll;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) {
      for (int s = 0; s < 3; ++s) sums[s][threadIdx.x] += sums[s][threadIdx.x + half];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) term_outputs(k, per_sample, sums[0][0], sums[1][0], sums[2][0], result + 3 * b);
}

at::Tensor vb_terms_cuda(const at::Tensor& x0, const at::Tensor& noise, const at::Tensor& out, const at::Tensor& row) {
  const int64_t per_sample = check_vb_terms_args(x0, noise, out, row);
  const c10::cuda::CUDAGuard guard(x0.device());
  const int64_t batch = x0.size(0);
  at::Tensor result = at::empty({batch, 3}, x0.options().dtype(at::kDouble));
  if (batch == 0) return result;
  TORCH_CHECK(batch <= 2147483647, "ddpm_fast::vb_terms: at most 2^31 - 1 samples a call, got ", batch);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "vb_terms_cuda", [&] {
    vb_terms_kernel<scalar_t><<<static_cast<unsigned int>(batch), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x0.data_ptr<float>(), noise.data_ptr<float>(), out.data_ptr<scalar_t>(), row.data_ptr<double>(), layout_of(x0),
        layout_of(noise), layout_of(out), per_sample, result.data_ptr<double>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) {
  m.impl("vb_terms", &vb_terms_cuda);
}

}  // namespace ddpm_fast
