// The noise stream of DESIGN §3 for a run of consecutive quads of one sample, on the CPU:
// AVX2 (eight Philox calls a vector, SLEEF's 1-ulp log/sin/cos that torch ships and itself
// uses for torch.log/sin/cos) where the CPU has it, csrc/common/philox.h's scalar recipe elsewhere.
#pragma once

#include <cstdint>

namespace ddpm_fast {

// Writes the four normals of each quad q0 .. q0 + count − 1 of (seed, sample, key) to
// dst[4·(q − q0) + j], j = 0..3 — i.e. the logical elements 4·q0 .. 4·(q0 + count) − 1.
void normal_quads(uint64_t seed, uint32_t sample, uint32_t key, uint32_t q0, int64_t count, float* dst);

}  // namespace ddpm_fast

#include <ATen/Parallel.h>

#include <algorithm>

#include "../../noise.h"

namespace ddpm_fast {

constexpr int64_t kChunkQuads = 64;  // 256 normals: a chunk's noise stays in L1 while it is used

// Runs f(b, e0, z, n) in parallel over chunks of every sample's noise under `key`: z holds the
// n normals of sample b's logical elements e0 .. e0 + n − 1. Chunks are fixed by the shape
// alone, so results never depend on the thread count.
template <typename F>
void for_each_noise_chunk(const NoiseShape& shape, uint64_t seed, uint32_t key, uint32_t sample_offset, const F& f) {
  const int64_t chunks = (shape.quads + kChunkQuads - 1) / kChunkQuads;
  at::parallel_for(0, shape.batch * chunks, 16, [&](int64_t begin, int64_t end) {
    float z[4 * kChunkQuads];
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / chunks, q0 = (i % chunks) * kChunkQuads;
      const int64_t quads = std::min(kChunkQuads, shape.quads - q0);
      normal_quads(seed, sample_offset + static_cast<uint32_t>(b), key, static_cast<uint32_t>(q0), quads, z);
      f(b, 4 * q0, z, std::min(4 * quads, shape.per_sample - 4 * q0));
    }
  });
}

}  // namespace ddpm_fast
