// Argument checks shared by the CPU and CUDA kernels of the noise ops (csrc/ops.cpp has
// the schemas). The Python wrappers check the same things first with friendlier
// messages; these guard direct torch.ops.ddpm_fast calls.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "common/contract.h"

namespace ddpm_fast {

inline void check_philox_args(const at::Tensor& counter, int64_t seed) {
  constexpr const char* op = "ddpm_fast::philox4x32_10";
  TORCH_CHECK(counter.scalar_type() == at::kInt, op,
              ": counter must be int32 (the bit patterns of uint32 words), got ",
              counter.scalar_type());
  TORCH_CHECK(counter.dim() >= 1 && counter.size(-1) == 4, op,
              ": counter must have shape [..., 4], got ", counter.sizes());
  check_seed(op, seed);
}

// The shape of a noise draw: `batch` samples of `per_sample` elements, four per Philox call.
struct NoiseShape {
  int64_t batch;
  int64_t per_sample;
  int64_t quads;
};

inline NoiseShape check_randn_args(const at::Tensor& out, int64_t seed, int64_t step,
                                   int64_t sample_offset) {
  constexpr const char* op = "ddpm_fast::randn_";
  TORCH_CHECK(out.scalar_type() == at::kFloat, op, ": out must be float32, got ",
              out.scalar_type());
  TORCH_CHECK(out.dim() >= 1, op, ": out must have a batch dimension, got shape ", out.sizes());
  TORCH_CHECK(out.is_contiguous(), op,
              ": out must be contiguous (the element index is the logical NCHW index)");
  check_seed(op, seed);
  TORCH_CHECK(step >= 0 && step < kUint32Range, op, ": step must be in [0, 2^32), got ", step);
  const int64_t batch = out.size(0);
  TORCH_CHECK(sample_offset >= 0 && sample_offset + batch <= kUint32Range, op,
              ": sample indices [sample_offset, sample_offset + batch) must lie in [0, 2^32), got [",
              sample_offset, ", ", sample_offset + batch, ")");
  const int64_t per_sample = batch == 0 ? 0 : out.numel() / batch;
  const int64_t quads = (per_sample + 3) / 4;
  TORCH_CHECK(quads <= kUint32Range, op, ": at most 2^34 elements per sample, got ", per_sample);
  return {batch, per_sample, quads};
}

}  // namespace ddpm_fast
