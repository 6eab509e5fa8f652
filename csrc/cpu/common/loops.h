// Helpers shared by the CPU kernels' loops (csrc/cpu/diffusion_step.cpp, group_norm_silu.cpp,
// vb_terms.cpp).
#pragma once

#include <cstdint>
#include <type_traits>

#include "../../diffusion_step.h"

namespace ddpm_fast {

// Kernels compiled for AVX-512, AVX2+FMA and the baseline, picked at load time (GCC's function
// multiversioning), since the distributed build cannot assume the CPU; what they call is always
// inlined, so it is compiled for the same target. GCC's resolver picks a clone by the CPU's
// features, not its model: libgcc sets x86-64-v3 where CPUID shows AVX2, FMA, BMI1/2, F16C, LZCNT,
// MOVBE (and v2's), x86-64-v4 where AVX-512 F/BW/CD/DQ/VL too (a Zen 3 takes the v3 clone). The
// source is one for all clones: a GCC vector type wider than 32 bytes has a register only in the
// v4 one, and lives in memory in the others (docs/DESIGN.md §5.2).
// ddpm_fast_cpu_vector_clone() (common/vector_clones.cpp) says which clone this CPU runs.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DDPM_FAST_CLONE_V4 "arch=x86-64-v4"
#define DDPM_FAST_CLONE_V3 "arch=x86-64-v3"
#define DDPM_FAST_VECTOR_CLONES __attribute__((target_clones(DDPM_FAST_CLONE_V4, DDPM_FAST_CLONE_V3, "default")))
#else
#define DDPM_FAST_VECTOR_CLONES
#endif

// Whether each sample of a [B, C, H, W] layout is dense NCHW, whatever the batch stride (the two
// halves of a 2C-channel output, torch.split(out, C, dim=1), are).
inline bool samples_are_dense(const Layout4d& l) {
  return l.stride_w == 1 && l.stride_h == l.width && l.stride_c == l.height * l.width;
}

// Whether a [B, C, H, W] layout is dense NCHW with `per_sample` elements a sample.
inline bool is_nchw_contiguous(const Layout4d& l, int64_t per_sample) {
  return samples_are_dense(l) && l.stride_b == per_sample;
}

// f(std::bool_constant<on>{}) for the run-time flag `on`: one loop per value, each compiled with the
// flag a constant, so that no element tests it and the loops vectorise.
template <typename F>
void with_flag(bool on, F&& f) {
  if (on) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

}  // namespace ddpm_fast
