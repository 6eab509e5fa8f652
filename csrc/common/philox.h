// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11)
// and the Gaussian recipe of DESIGN §3. One header for the CPU and CUDA backends, so
// both compute the same words; the recipe is Triton's tl.philox + uint_to_uniform_float
// + pair_uniform_to_normal, operation for operation, so the Triton kernels agree too.
#pragma once

#include <cmath>
#include <cstdint>

#include "contract.h"

#if defined(__CUDACC__)
#define DDPM_FAST_HD __host__ __device__ __forceinline__
#else
#define DDPM_FAST_HD inline
#endif

namespace ddpm_fast {

struct Philox4 {
  uint32_t w[4];
};

struct Normal4 {
  float v[4];
};

DDPM_FAST_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

DDPM_FAST_HD Philox4 philox4x32_10(Philox4 c, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint32_t hi0 = mulhi32(kPhiloxM0, c.w[0]), lo0 = kPhiloxM0 * c.w[0];
    const uint32_t hi1 = mulhi32(kPhiloxM1, c.w[2]), lo1 = kPhiloxM1 * c.w[2];
    c = Philox4{{hi1 ^ c.w[1] ^ k0, lo1, hi0 ^ c.w[3] ^ k1, lo0}};
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return c;
}

// Triton's uint_to_uniform_float: the word read as int32, negatives folded with ~x, then
// scaled by the largest float32 that keeps (2^31 - 1) * scale below 1: u ∈ [0, 1).
DDPM_FAST_HD float uint_to_uniform(uint32_t word) {
  int32_t x = static_cast<int32_t>(word);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * kUniformScale;
}

// Box–Muller on a pair of uniforms; a is clamped away from 0 so log(a) stays finite.
DDPM_FAST_HD void box_muller(float a, float b, float& n0, float& n1) {
  a = fmaxf(a, kBoxMullerMinU);
  const float theta = 6.283185307179586f * b;
  const float r = sqrtf(-2.0f * logf(a));
  n0 = r * cosf(theta);
  n1 = r * sinf(theta);
}

// The four normals of one Philox call: elements 4q .. 4q+3 of sample `sample` under noise
// key `key` (T for x_T, i for the update at timestep i).
DDPM_FAST_HD Normal4 normal4(uint64_t seed, uint32_t quad, uint32_t sample, uint32_t key) {
  const Philox4 words = philox4x32_10(Philox4{{quad, sample, key, kNoiseStreamVersion}},
                                      static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  Normal4 n;
  box_muller(uint_to_uniform(words.w[0]), uint_to_uniform(words.w[1]), n.v[0], n.v[1]);
  box_muller(uint_to_uniform(words.w[2]), uint_to_uniform(words.w[3]), n.v[2], n.v[3]);
  return n;
}

}  // namespace ddpm_fast
