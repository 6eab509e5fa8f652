// The CUDA kernel bodies of the noise ops, for nvcc (csrc/cuda/noise.cu) and the host emulator
// (csrc/emulator/, DESIGN §5.6): one thread per Philox call (four words, or four normals), grid-stride
// loops with 64-bit indices so tensors past 2^31 elements are covered. Parameters are __restrict__ as
// the kernels' are (csrc/cuda/diffusion_step.cuh says why).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

#include <cstdint>

#include "../common/grid.h"
#include "../common/philox.h"
#include "../noise.h"

namespace ddpm_fast {

constexpr int kNoiseThreads = 256;

template <class Thread>
DDPM_FAST_DEVICE void philox4x32_10_body(const Thread& t, const uint32_t* __restrict__ in, uint32_t* __restrict__ out,
                                         int64_t calls, uint64_t key) {
  for (int64_t i = t.block() * int64_t{t.threads()} + t.thread(); i < calls; i += int64_t{t.blocks()} * t.threads()) {
    const Philox4 w = philox4x32_10(Philox4{{in[4 * i], in[4 * i + 1], in[4 * i + 2], in[4 * i + 3]}},
                                    static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32));
#pragma unroll
    for (int j = 0; j < 4; ++j) out[4 * i + j] = w.w[j];
  }
}

// Sample b's elements 4q … 4q + 3 (those below per_sample) of the draw under key `step` (DESIGN §3).
template <class Thread>
DDPM_FAST_DEVICE void randn_body(const Thread& t, float* __restrict__ out, const NoiseShape& shape, uint64_t seed,
                                 uint32_t step, uint32_t sample_offset) {
  const int64_t calls = shape.batch * shape.quads;
  for (int64_t i = t.block() * int64_t{t.threads()} + t.thread(); i < calls; i += int64_t{t.blocks()} * t.threads()) {
    const int64_t b = i / shape.quads, q = i % shape.quads;
    const Normal4 n = normal4(seed, static_cast<uint32_t>(q), sample_offset + static_cast<uint32_t>(b), step);
    const int64_t e = 4 * q;
    float* dst = out + b * shape.per_sample + e;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (e + j < shape.per_sample) dst[j] = n.v[j];
    }
  }
}

// The ops' host side (checks, outputs, the kernels' arguments) around a launch, so that the CUDA
// launchers and the emulator run the same: launch(blocks, args…) must run the body over args….
template <class Launch>
at::Tensor run_philox4x32_10(const at::Tensor& counter, int64_t seed, Launch&& launch) {
  check_philox_args(counter, seed);
  const at::Tensor c = counter.contiguous();
  at::Tensor out = at::empty_like(c);
  const int64_t calls = c.numel() / 4;
  if (calls == 0) return out;
  launch(grid_stride_blocks(calls, kNoiseThreads), reinterpret_cast<const uint32_t*>(c.data_ptr<int32_t>()),
         reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>()), calls, static_cast<uint64_t>(seed));
  return out;
}

template <class Launch>
void run_randn_(const at::Tensor& out, int64_t seed, int64_t step, int64_t sample_offset, Launch&& launch) {
  const NoiseShape shape = check_randn_args(out, seed, step, sample_offset);
  const int64_t calls = shape.batch * shape.quads;
  if (calls == 0) return;
  launch(grid_stride_blocks(calls, kNoiseThreads), out.data_ptr<float>(), shape, static_cast<uint64_t>(seed),
         static_cast<uint32_t>(step), static_cast<uint32_t>(sample_offset));
}

}  // namespace ddpm_fast
