// CPU kernels of the noise ops: at::parallel_for (OpenMP in PyTorch's builds) over
// independent Philox calls, so the result never depends on the thread count.
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>

#include "../noise.h"
#include "../common/philox.h"
#include "common/normal_quads.h"

namespace ddpm_fast {
namespace {

constexpr int64_t kGrain = 4096;  // Philox calls per task: ~10 µs of work

at::Tensor philox4x32_10_cpu(const at::Tensor& counter, int64_t seed) {
  check_philox_args(counter, seed);
  TORCH_CHECK(counter.device().is_cpu(), "ddpm_fast::philox4x32_10 (CPU kernel): counter on ",
              counter.device());
  const at::Tensor c = counter.contiguous();
  at::Tensor out = at::empty_like(c);
  const auto* in = reinterpret_cast<const uint32_t*>(c.data_ptr<int32_t>());
  auto* words = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  const uint64_t key = static_cast<uint64_t>(seed);
  at::parallel_for(0, c.numel() / 4, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Philox4 w = philox4x32_10(Philox4{{in[4 * i], in[4 * i + 1], in[4 * i + 2], in[4 * i + 3]}},
                                      static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32));
      std::copy(w.w, w.w + 4, words + 4 * i);
    }
  });
  return out;
}

void randn_cpu(const at::Tensor& out, int64_t seed, int64_t step, int64_t sample_offset) {
  const NoiseShape shape = check_randn_args(out, seed, step, sample_offset);
  TORCH_CHECK(out.device().is_cpu(), "ddpm_fast::randn_ (CPU kernel): out on ", out.device());
  float* dst = out.data_ptr<float>();
  for_each_noise_chunk(shape, static_cast<uint64_t>(seed), static_cast<uint32_t>(step),
                       static_cast<uint32_t>(sample_offset), [&](int64_t b, int64_t e0, const float* z, int64_t n) {
                         std::copy(z, z + n, dst + b * shape.per_sample + e0);
                       });
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) {
  m.impl("philox4x32_10", &philox4x32_10_cpu);
  m.impl("randn_", &randn_cpu);
}

}  // namespace ddpm_fast
