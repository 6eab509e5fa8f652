// The facts every backend shares, mirrored from ddpm_fast/contract.py (a test compares the
// two): the noise stream's constants (DESIGN §3), the step table's width (DESIGN §2), the term
// table's width and the decoder's bins (DESIGN §2.6) and the ranges of seeds, noise keys and sample indices.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>

namespace ddpm_fast {

// The counter's last word: bump it whenever the stream changes, never change the stream
// silently (a released seed must keep drawing the same samples).
constexpr uint32_t kNoiseStreamVersion = 0;

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;  // round multipliers
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // Weyl key increments
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;
constexpr float kUniformScale = 4.6566127342e-10f;  // largest float32 with (2^31 - 1) * scale < 1
constexpr float kBoxMullerMinU = 1.0e-7f;  // Box–Muller's first uniform is clamped here

constexpr int64_t kUint32Range = int64_t{1} << 32;  // noise keys and sample indices are uint32 words

// Columns of a step-table row: A, B, C, D, E, sigma, clip, H, w, Gout, Gmean, learned, log_beta, log_beta_tilde.
constexpr int64_t kStepColumns = 14;
// The learned column of a row whose network outputs log Σ itself ("learned"; "learned_range" is 1, a fixed
// variance 0: contract.LEARNED_VARIANCES).
constexpr float kLearnedLog = 2.0f;

// The fused term op's row (ddpm_fast/contract.py TERM_COLUMNS): B, P, Q, clip, c1, inv_sigma, kl_const, decoder.
constexpr int64_t kTermColumns = 8;
constexpr float kBinHalfWidth = 0.003921568627f;  // 1/255: data in [-1, 1] on 256 levels (eq. 13)
constexpr float kEdgeBin = 0.999f;                // |x_0| above this is an edge bin, extended to ±inf

inline void check_seed(const char* op, int64_t seed) {
  TORCH_CHECK(seed >= 0, op, ": seed must be in [0, 2^63), got ", seed);
}

}  // namespace ddpm_fast
