// See normal_quads.h. The AVX2 path computes the same Philox words and uniforms bit for bit
// as the scalar recipe (integer arithmetic and one rounding int32→float32, one product);
// its normals differ from libm's by SLEEF's and libm's ≤ 1-ulp errors only.
#include "normal_quads.h"

#include <algorithm>
#include <cstdlib>

#include "../../common/philox.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma")

// SLEEF's AVX2 entry points, exported by libtorch_cpu. Weak, so a torch built without them
// leaves null pointers and the scalar path runs instead of a failed load.
extern "C" {
typedef struct {
  __m256 x, y;
} Sleef___m256_2;  // as in sleef.h: (sin, cos)
__m256 Sleef_logf8_u10avx2(__m256) __attribute__((weak));
Sleef___m256_2 Sleef_sincosf8_u10avx2(__m256) __attribute__((weak));
}

namespace ddpm_fast {
namespace {

// High halves of the 32×32-bit products of eight lanes with m.
inline __m256i mulhi8(__m256i a, uint32_t m) {
  const __m256i mv = _mm256_set1_epi32(static_cast<int>(m));
  const __m256i even = _mm256_srli_epi64(_mm256_mul_epu32(a, mv), 32);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), mv);
  return _mm256_blend_epi32(even, odd, 0b10101010);
}

inline __m256i mullo8(__m256i a, uint32_t m) { return _mm256_mullo_epi32(a, _mm256_set1_epi32(static_cast<int>(m))); }

inline __m256 uniform8(__m256i word) {
  const __m256i folded = _mm256_xor_si256(word, _mm256_srai_epi32(word, 31));  // x < 0 ? ~x : x
  return _mm256_mul_ps(_mm256_cvtepi32_ps(folded), _mm256_set1_ps(kUniformScale));
}

inline void box_muller8(__m256 a, __m256 b, __m256& n0, __m256& n1) {
  a = _mm256_max_ps(a, _mm256_set1_ps(kBoxMullerMinU));
  const __m256 theta = _mm256_mul_ps(_mm256_set1_ps(6.283185307179586f), b);
  const __m256 r = _mm256_sqrt_ps(_mm256_mul_ps(_mm256_set1_ps(-2.0f), Sleef_logf8_u10avx2(a)));
  const Sleef___m256_2 sin_cos = Sleef_sincosf8_u10avx2(theta);
  n0 = _mm256_mul_ps(r, sin_cos.y);
  n1 = _mm256_mul_ps(r, sin_cos.x);
}

// Normals of quads q0 .. q0 + 7, stored quad-major: dst[4·lane + j].
void normal_quads8(uint64_t seed, uint32_t sample, uint32_t key, uint32_t q0, float* dst) {
  __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(q0)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256i c1 = _mm256_set1_epi32(static_cast<int>(sample));
  __m256i c2 = _mm256_set1_epi32(static_cast<int>(key));
  __m256i c3 = _mm256_set1_epi32(static_cast<int>(kNoiseStreamVersion));
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const __m256i hi0 = mulhi8(c0, kPhiloxM0), lo0 = mullo8(c0, kPhiloxM0);
    const __m256i hi1 = mulhi8(c2, kPhiloxM1), lo1 = mullo8(c2, kPhiloxM1);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
    c1 = lo1;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  __m256 n0, n1, n2, n3;
  box_muller8(uniform8(c0), uniform8(c1), n0, n1);
  box_muller8(uniform8(c2), uniform8(c3), n2, n3);
  // 4×8 → 8×4 transpose: lane i of n0..n3 becomes quad i
  const __m256 t0 = _mm256_unpacklo_ps(n0, n1), t1 = _mm256_unpackhi_ps(n0, n1);
  const __m256 t2 = _mm256_unpacklo_ps(n2, n3), t3 = _mm256_unpackhi_ps(n2, n3);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  _mm256_storeu_ps(dst, _mm256_permute2f128_ps(u0, u1, 0x20));
  _mm256_storeu_ps(dst + 8, _mm256_permute2f128_ps(u2, u3, 0x20));
  _mm256_storeu_ps(dst + 16, _mm256_permute2f128_ps(u0, u1, 0x31));
  _mm256_storeu_ps(dst + 24, _mm256_permute2f128_ps(u2, u3, 0x31));
}

}  // namespace
}  // namespace ddpm_fast

#pragma GCC pop_options

namespace ddpm_fast {
namespace {
// DDPM_FAST_DISABLE_AVX2=1 forces the scalar path (tests use it to cover that path here).
bool has_avx2() {
  static const bool ok = std::getenv("DDPM_FAST_DISABLE_AVX2") == nullptr &&
                         __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         Sleef_logf8_u10avx2 != nullptr && Sleef_sincosf8_u10avx2 != nullptr;
  return ok;
}
}  // namespace
}  // namespace ddpm_fast
#define DDPM_FAST_HAVE_AVX2_PATH 1
#endif

namespace ddpm_fast {

void normal_quads(uint64_t seed, uint32_t sample, uint32_t key, uint32_t q0, int64_t count, float* dst) {
  int64_t done = 0;
#if defined(DDPM_FAST_HAVE_AVX2_PATH)
  if (has_avx2()) {
    for (; done + 8 <= count; done += 8) {
      normal_quads8(seed, sample, key, q0 + static_cast<uint32_t>(done), dst + 4 * done);
    }
    if (done < count) {
      float tail[32];
      normal_quads8(seed, sample, key, q0 + static_cast<uint32_t>(done), tail);
      std::copy(tail, tail + 4 * (count - done), dst + 4 * done);
      done = count;
    }
  }
#endif
  for (; done < count; ++done) {
    const Normal4 n = normal4(seed, q0 + static_cast<uint32_t>(done), sample, key);
    std::copy(n.v, n.v + 4, dst + 4 * done);
  }
}

}  // namespace ddpm_fast
