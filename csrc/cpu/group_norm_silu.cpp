// CPU kernels of the fused GroupNorm + SiLU (csrc/group_norm_silu.h), forward and backward:
// at::parallel_for (OpenMP) over blocks — one (n, group) in NCHW, a run of groups of one sample in
// NHWC (≥ kBlockChannels channels, so even a batch of 1 has several blocks) — so that the inner
// loops are long unit-stride runs either way (a channel's positions, a position's channels) that
// the compiler vectorises: sums in float lanes, SiLU through a polynomial e^x instead of a libm
// call, and no heap allocation per block (the U-Net's 4×4 blocks hold 128 elements, where
// per-block overheads, not memory, set the time). A DDPM U-Net block (≤ 32 KiB in NCHW, ≤ 256 KiB
// in NHWC) stays in cache between its passes, so x comes from memory once; larger ones
// (LSUN-256: 4 channels × 65,536 positions a group) are simply read again.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/macros/Macros.h>
#include <c10/util/SmallVector.h>
#include <c10/util/bit_cast.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "../group_norm_silu.h"
#include "common/loops.h"

namespace ddpm_fast {
namespace {

// The per-block kernels are compiled for several targets (DDPM_FAST_VECTOR_CLONES, common/loops.h).
constexpr int64_t kChunk = 1024;  // elements per float partial sum before it joins a double total
constexpr int64_t kGrain = 32768;  // elements per task: smaller calls run on one thread
constexpr int64_t kLanes = 16;  // float partial sums of an NCHW group: two 32-byte vectors (kPieces)
constexpr int64_t kBlockChannels = 64;  // an NHWC block's channels at least
constexpr int64_t kBlockElements = 2048;  // an NCHW block's elements at least (whole groups; one may hold more)
constexpr int64_t kStackChannels = 128;  // per-channel scratch on the stack up to this many (a 4×4 NCHW block's)

// SiLU and σ for float without a libm call or a branch, so the loops around them vectorise (a
// float comparison may trap, which stops GCC's if-conversion; a clamp it can constant-fold
// becomes a branch). Clamps are on the bits, where integers compare in order.
constexpr int32_t kExpLimit = 0x42AE0000;  // the bits of 87.0f: e^±87 and 1 + e^87 are normal floats

// x with |x| clamped to 87 and its sign kept; a NaN becomes ±87. The integer minimum is one
// instruction (vpminsd), where the same minimum as arithmetic on the difference took four: the
// AVX2 clone's SiLU pass −8% (benchmarks/results/2026-12-07-cpu-gn-avx2.md).
C10_ALWAYS_INLINE float clamp_exp_argument(float x) {
  const int32_t bits = c10::bit_cast<int32_t>(x);
  const int32_t magnitude = bits & 0x7FFFFFFF;
  return c10::bit_cast<float>((magnitude < kExpLimit ? magnitude : kExpLimit) | (bits & INT32_MIN));
}

// e^x for x ∈ [−87, 87], Cephes' expf reduction: x = n·ln2 + r with n = round(x·log2 e) taken
// from the low mantissa bits of x·log2 e + 1.5·2^23, 2^n from the exponent bits, and for e^r
// (|r| ≤ ln2/2) 1 + r + r²·q(r) with q a degree-3 polynomial fitted to the relative error
// (at most 1.8e-7 evaluated in float; Cephes' degree-7 one is exact to float rounding but costs
// two more FMAs an element, where the SiLU is the forward's compute).
C10_ALWAYS_INLINE float exp_in_range(float x) {
  const float t = x * 1.44269504088896341f + 12582912.0f;
  const float n = t - 12582912.0f;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float q = 8.3125279796e-3f;
  q = q * r + 4.1890117970e-2f;
  q = q * r + 1.6667114447e-1f;
  q = q * r + 4.9999231747e-1f;
  const float e_r = q * r * r + r + 1.0f;
  return e_r * c10::bit_cast<float>((c10::bit_cast<int32_t>(t) - 0x4B400000 + 127) << 23);
}

// z·σ(z) = z/(1 + e^−z): one exponential and one division. Beyond |z| = 87 the clamp changes
// e^−z but not the result's rounding (z/(1 + e^−87) = z); a NaN z stays NaN.
C10_ALWAYS_INLINE float silu(float z) {
  return z / (1.0f + exp_in_range(clamp_exp_argument(-z)));
}

// σ(z) from e = e^−|z|: 1/(1 + e) for z ≥ 0 and e/(1 + e) below, so e never overflows; σ of a
// NaN is finite (the backward multiplies it by the NaN's gradient terms).
C10_ALWAYS_INLINE float sigmoid(float z) {
  const int32_t bits = c10::bit_cast<int32_t>(z);
  const float e = exp_in_range(-std::abs(clamp_exp_argument(z)));
  const int32_t negative = bits >> 31;  // all ones where z < 0
  const float numerator = c10::bit_cast<float>((c10::bit_cast<int32_t>(e) & negative) |
                                               (c10::bit_cast<int32_t>(1.0f) & ~negative));
  return numerator / (1.0f + e);
}

// float64 is for gradcheck, not speed
inline double silu(double z) {
  return z / (1.0 + std::exp(-z));
}

inline double sigmoid(double z) {
  return 1.0 / (1.0 + std::exp(-z));
}


// Calls f(hw), hw a compile-time constant when it is kLanes: a 4×4 NCHW channel is one vector,
// and with its length known each channel's output loop is that vector alone, where a loop of
// unknown length paid its setup and remainder checks per channel (−20% of the 4×4 kernel). The
// statistics' loops (nchw_total) measured slower specialised so, and are not.
template <typename F>
C10_ALWAYS_INLINE void with_positions(int64_t hw, const F& f) {
  if (hw == kLanes) {
    f(std::integral_constant<int64_t, kLanes>{});
  } else {
    f(hw);
  }
}

// One task's share of a sample: a run of whole groups, fixed by the shape (never by the thread
// count). NCHW: groups together up to kBlockElements (a channel's positions make long
// unit-stride rows; a 4×4 group of 128 elements alone would pay the block's fixed costs for
// little work). NHWC: at least kBlockChannels channels (a position's channels are contiguous,
// so the inner loops run over all of them rather than C/G), or the whole sample when C is
// smaller. A sample thus gives several blocks in either layout: a batch of 1 keeps every
// thread busy.
struct Block {
  int64_t n, g0, groups;  // sample, first group, groups in the block
  int64_t c0, channels;   // first channel, channels in the block
  int64_t hw, row;        // positions, and the stride between positions in NHWC (C)
  int64_t offset;         // of element (n, c0, 0, 0)
};

// Scratch of one value per channel of a block, on the stack for blocks of ≤ kStackChannels.
template <typename V>
using PerChannel = c10::SmallVector<V, kStackChannels>;

int64_t groups_per_block(const GroupNormShape& s) {
  const int64_t cg = s.group_channels();
  const auto enough = [&](int64_t groups) {
    return s.nchw ? groups * cg * s.hw >= kBlockElements : groups * cg >= kBlockChannels;
  };
  int64_t groups = 1;  // the fewest that divide G and are enough
  while (groups < s.groups && (!enough(groups) || s.groups % groups != 0)) ++groups;
  return groups;
}

Block block_of(const GroupNormShape& s, int64_t i) {
  const int64_t groups = groups_per_block(s), per_sample = s.groups / groups;
  const int64_t n = i / per_sample, g0 = (i % per_sample) * groups, cg = s.group_channels();
  return {n, g0, groups, g0 * cg, groups * cg, s.hw, s.channels, s.group_offset(n, g0)};
}

template <typename V, int64_t kN>
struct VectorOf {
  typedef V type __attribute__((vector_size(kN * sizeof(V))));
};

// The kLanes partial sums of an NCHW group are kept as kPieces GCC vectors of 32 bytes (one AVX2
// register each), not one vector of kLanes: the kernels' source is shared by every clone, and a
// 64-byte vector has a register only in the AVX-512 one; in the AVX2 clone GCC kept it in the
// stack and moved it through general registers every 16 elements (the forward's statistics 4×
// slower than AVX-512's). Pieces of 32 bytes are registers in both (two ymm a 16-lane
// vector in either: AVX-512 loses nothing measurable, docs/DESIGN.md §5.2).
template <typename V>
constexpr int64_t kPieceLanes = 32 / static_cast<int64_t>(sizeof(V));
template <typename V>
constexpr int64_t kPieces = kLanes / kPieceLanes<V>;
template <typename V>
using Piece = typename VectorOf<V, kPieceLanes<V>>::type;

// Σ of a vector's kN lanes as a tree of vector additions, halves added to halves (lane j to lane
// j + kN/2): a half is a register's extract, not a round trip through the stack.
template <typename V, int64_t kN>
C10_ALWAYS_INLINE V lane_sum(const typename VectorOf<V, kN>::type& v) {
  if constexpr (kN == 1) {
    return v[0];
  } else {
    typename VectorOf<V, kN / 2>::type low, high;
    std::memcpy(&low, &v, sizeof low);
    std::memcpy(&high, reinterpret_cast<const char*>(&v) + sizeof low, sizeof high);
    return lane_sum<V, kN / 2>(low + high);
  }
}

// Σ of the kLanes partial sums held as pieces, in the same tree as one kLanes-vector's lane_sum
// (lane j + lane j + kLanes/2 first: piece k + piece k + kPieces/2), so the rounding is the same.
template <typename V>
C10_ALWAYS_INLINE V pieces_sum(const Piece<V> (&pieces)[kPieces<V>]) {
  Piece<V> tree[kPieces<V>];
#pragma GCC unroll 8
  for (int64_t k = 0; k < kPieces<V>; ++k) tree[k] = pieces[k];
#pragma GCC unroll 8
  for (int64_t n = kPieces<V>; n > 1; n /= 2) {
#pragma GCC unroll 8
    for (int64_t k = 0; k < n / 2; ++k) tree[k] += tree[k + n / 2];
  }
  return lane_sum<V, kPieceLanes<V>>(tree[0]);
}

// Σ_c Σ_p f(c, c·hw + p) over channels c0 … c0 + channels − 1 of an NCHW block: kLanes partial
// sums that run across channels (so a 4×4 channel costs no horizontal sum of its own), each
// gathered into a double total before it holds more than kChunk terms.
template <typename F>
C10_ALWAYS_INLINE double nchw_total(const Block& b, int64_t c0, int64_t channels, const F& f) {
  using V = decltype(f(int64_t{0}, int64_t{0}));
  constexpr int64_t kW = kPieceLanes<V>, kP = kPieces<V>;
  const int64_t hw = b.hw, span = std::min(hw, kChunk * kLanes);  // a lane takes ≤ kChunk terms a span
  const int64_t terms = (span + kLanes - 1) / kLanes;
  Piece<V> lanes[kP] = {};
  double total = 0;
  int64_t held = 0;  // terms per lane since the last gathering
  const auto gather = [&] {  // a tree: 4 dependent additions, not 16
    total += pieces_sum<V>(lanes);
#pragma GCC unroll 8
    for (int64_t k = 0; k < kP; ++k) lanes[k] = Piece<V>{};
    held = 0;
  };
  for (int64_t c = c0; c < c0 + channels; ++c) {
    for (int64_t p0 = 0; p0 < hw; p0 += span) {
      const int64_t p1 = std::min(hw, p0 + span);
      if (held + terms > kChunk) gather();
      int64_t p = p0;
      for (; p + kLanes <= p1; p += kLanes) {
#pragma GCC unroll 8
        for (int64_t k = 0; k < kP; ++k) {
          Piece<V> v = {};  // every lane is set below; the initialiser only quiets -Wmaybe-uninitialized
#pragma GCC unroll 16
          for (int64_t j = 0; j < kW; ++j) v[j] = f(c, c * hw + p + k * kW + j);
          lanes[k] += v;
        }
      }
      if (p < p1) {  // the last, partial vector, zero-padded (lanes[j] += … would keep lanes in memory)
#pragma GCC unroll 8
        for (int64_t k = 0; k < kP; ++k) {
          Piece<V> v = {};
          for (int64_t j = 0; j < kW && p + k * kW + j < p1; ++j) v[j] = f(c, c * hw + p + k * kW + j);
          lanes[k] += v;
        }
      }
      held += terms;
    }
  }
  gather();
  return total;
}

// sums[c] = Σ_p f(c, offset of (c, p)) over the channels c and positions p of an NHWC block:
// float partial sums over at most kChunk elements, gathered in double.
template <typename F>
C10_ALWAYS_INLINE void nhwc_channel_sums(const Block& b, const F& f, double* sums) {
  using V = decltype(f(int64_t{0}, int64_t{0}));
  const int64_t cb = b.channels, hw = b.hw;
  PerChannel<V> part(cb);
  std::fill(sums, sums + cb, 0.0);
  const int64_t rows = std::max<int64_t>(1, kChunk / cb);
  for (int64_t p0 = 0; p0 < hw; p0 += rows) {
    std::fill(part.begin(), part.end(), V(0));
    V* __restrict__ acc = part.data();
    for (int64_t p = p0; p < std::min(hw, p0 + rows); ++p) {
#pragma omp simd
      for (int64_t c = 0; c < cb; ++c) acc[c] += f(c, p * b.row + c);
    }
    for (int64_t c = 0; c < cb; ++c) sums[c] += part[c];
  }
}

// sums[c] = Σ_p f(c, offset of (c, p)) over the channels c and positions p of a block: float
// partial sums over at most kChunk elements, gathered in double (the backward's per-channel sums).
template <bool kNCHW, typename F>
C10_ALWAYS_INLINE void channel_sums(const Block& b, const F& f, double* sums) {
  using V = decltype(f(int64_t{0}, int64_t{0}));
  if constexpr (kNCHW) {
    const int64_t hw = b.hw;
    for (int64_t c = 0; c < b.channels; ++c) {
      double total = 0;
      for (int64_t p0 = 0; p0 < hw; p0 += kChunk) {
        const int64_t p1 = std::min(hw, p0 + kChunk);
        V part = 0;
#pragma omp simd reduction(+ : part)
        for (int64_t p = p0; p < p1; ++p) part += f(c, c * hw + p);
        total += part;
      }
      sums[c] = total;
    }
  } else {
    nhwc_channel_sums(b, f, sums);
  }
}

template <bool kNCHW, typename F>
C10_ALWAYS_INLINE void for_each_element(const Block& b, const F& f) {
  const int64_t cb = b.channels, hw = b.hw;
  if constexpr (kNCHW) {
    with_positions(hw, [&](auto positions) {
      for (int64_t c = 0; c < cb; ++c) {
#pragma omp simd
        for (int64_t p = 0; p < positions; ++p) f(c, c * positions + p);
      }
    });
  } else {
    for (int64_t p = 0; p < hw; ++p) {
#pragma omp simd
      for (int64_t c = 0; c < cb; ++c) f(c, p * b.row + c);
    }
  }
}

// Per channel of the block, the mean over its group of sums[c]/hw: Σ_{c' in c's group} sums[c'] / (C/G·hw).
template <typename A>
PerChannel<A> group_means(const Block& b, const PerChannel<double>& sums) {
  const int64_t cg = b.channels / b.groups;
  PerChannel<A> means(b.channels);
  for (int64_t j = 0; j < b.groups; ++j) {
    double t = 0;
    for (int64_t c = j * cg; c < (j + 1) * cg; ++c) t += sums[c];
    std::fill(means.begin() + j * cg, means.begin() + (j + 1) * cg, static_cast<A>(t / static_cast<double>(cg * b.hw)));
  }
  return means;
}

// The pointers of one call; per-channel and per-(n, c) tensors are contiguous, add, scale and shift
// may be null.
template <typename T, typename A>
struct GroupNormArgs {
  const T* x;
  const T* weight;
  const T* bias;
  const T* add;
  const T* scale;
  const T* shift;
  A* mean;
  A* rstd;
};

// The block's per-channel add[n, c0 + c] (0 without an add) and the coefficients of its affine in
// the statistics' type, weight·(1 + scale[n, c]) and bias·(1 + scale[n, c]) + shift[n, c]: a block
// lies in one sample, so the scale-shift costs nothing per element.
template <typename A>
struct ChannelParams {
  PerChannel<A> add, weight, bias;
};

template <typename T, typename A>
ChannelParams<A> channel_params(const GroupNormArgs<T, A>& a, const GroupNormShape& s, const Block& b) {
  ChannelParams<A> p{PerChannel<A>(b.channels, A(0)), PerChannel<A>(b.channels), PerChannel<A>(b.channels)};
  for (int64_t c = 0; c < b.channels; ++c) {
    const int64_t nc = b.n * s.channels + b.c0 + c;
    if (a.add != nullptr) p.add[c] = static_cast<A>(a.add[nc]);
    p.weight[c] = static_cast<A>(a.weight[b.c0 + c]);
    p.bias[c] = static_cast<A>(a.bias[b.c0 + c]);
    apply_scale_shift(p.weight[c], p.bias[c], a.scale, a.shift, nc);
  }
  return p;
}

// Per channel of the block, its group's mean and variance of x + add: from each group's totals
// in NCHW, from per-channel sums in NHWC. Two passes, not E[x²] − mean².
template <bool kNCHW, typename A, typename F>
C10_ALWAYS_INLINE void group_moments(const Block& b, const F& value, PerChannel<A>& mean, PerChannel<A>& var) {
  const int64_t cg = b.channels / b.groups;
  if constexpr (kNCHW) {
    // group by group within each pass, so that the groups' short dependency chains (a total,
    // a division) overlap in the core rather than run one after another
    const int64_t groups = b.groups;
    const double count = static_cast<double>(cg * b.hw);
    PerChannel<A> m(groups), v(groups);
    for (int64_t j = 0; j < groups; ++j) m[j] = static_cast<A>(nchw_total(b, j * cg, cg, value) / count);
    for (int64_t j = 0; j < groups; ++j) {
      const A mj = m[j];
      v[j] = static_cast<A>(nchw_total(b, j * cg, cg, [&](int64_t c, int64_t o) {
        const A d = value(c, o) - mj;
        return d * d;
      }) / count);
    }
    for (int64_t j = 0; j < groups; ++j) {
      std::fill(mean.begin() + j * cg, mean.begin() + (j + 1) * cg, m[j]);
      std::fill(var.begin() + j * cg, var.begin() + (j + 1) * cg, v[j]);
    }
  } else {
    PerChannel<double> sums(b.channels);
    nhwc_channel_sums(b, value, sums.data());
    mean = group_means<A>(b, sums);
    const A* m = mean.data();
    nhwc_channel_sums(b, [&](int64_t c, int64_t o) {
      const A d = value(c, o) - m[c];
      return d * d;
    }, sums.data());
    var = group_means<A>(b, sums);
  }
}

// kAdd: whether there is an add; without one, x itself, not x + 0 (an operation an element in every
// pass, which the compiler may not drop: −0 + 0 is +0): the AVX2 clone's 8×256×8×8 0.068 → 0.064 ms.
template <typename T, bool kNCHW, bool kAct, bool kAdd>
DDPM_FAST_VECTOR_CLONES void forward_block(const GroupNormShape& s, const Block& b,
                                           const GroupNormArgs<T, at::opmath_type<T>>& a, T* y, double eps) {
  using A = at::opmath_type<T>;
  const T* __restrict__ xb = a.x + b.offset;
  T* __restrict__ yb = y + b.offset;
  const ChannelParams<A> params = channel_params(a, s, b);
  const A *ad = params.add.data(), *w = params.weight.data(), *bi = params.bias.data();
  // (x + add) − mean, never x + (add − mean): a value equal to the mean gives exactly 0
  const auto value = [&](int64_t c, int64_t o) {
    if constexpr (kAdd) {
      return static_cast<A>(xb[o]) + ad[c];
    } else {
      return static_cast<A>(xb[o]);
    }
  };
  PerChannel<A> mean(b.channels), var(b.channels);
  group_moments<kNCHW>(b, value, mean, var);
  const int64_t cg = s.group_channels();
  PerChannel<A> scale(b.channels);  // y = act((x + add − mean)·scale + bias)
  for (int64_t j = 0; j < b.groups; ++j) {  // one square root a group
    const A rstd = static_cast<A>(1.0 / std::sqrt(static_cast<double>(var[j * cg]) + eps));
    for (int64_t c = j * cg; c < (j + 1) * cg; ++c) scale[c] = rstd * w[c];
    a.mean[b.n * s.groups + b.g0 + j] = mean[j * cg];
    a.rstd[b.n * s.groups + b.g0 + j] = rstd;
  }
  const A *m = mean.data(), *sc = scale.data();
  for_each_element<kNCHW>(b, [&](int64_t c, int64_t o) {
    const A z = (value(c, o) - m[c]) * sc[c] + bi[c];
    yb[o] = static_cast<T>(kAct ? silu(z) : z);
  });
}

// The per-(n, c) outputs of the backward: Σ dz, Σ dz·x̂ and grad_add = Σ grad_x.
template <typename A>
struct BackwardSums {
  A* dz;
  A* dz_xhat;
  A* grad_add;
};

template <typename T, bool kNCHW, bool kAct>
DDPM_FAST_VECTOR_CLONES void backward_block(const GroupNormShape& s, const Block& b,
                                            const GroupNormArgs<T, at::opmath_type<T>>& a, const T* grad_y,
                                            T* grad_x, const BackwardSums<at::opmath_type<T>>& out) {
  using A = at::opmath_type<T>;
  const T* __restrict__ xb = a.x + b.offset;
  const T* __restrict__ gy = grad_y + b.offset;
  T* __restrict__ gx = grad_x + b.offset;
  const ChannelParams<A> params = channel_params(a, s, b);
  const A *ad = params.add.data(), *w = params.weight.data(), *bi = params.bias.data();
  const int64_t cg = s.group_channels();
  PerChannel<A> mean(b.channels), rstd(b.channels);
  for (int64_t c = 0; c < b.channels; ++c) {
    mean[c] = a.mean[b.n * s.groups + b.g0 + c / cg];
    rstd[c] = a.rstd[b.n * s.groups + b.g0 + c / cg];
  }
  const A *m = mean.data(), *r = rstd.data();
  const auto xhat = [&](int64_t c, int64_t o) { return (static_cast<A>(xb[o]) + ad[c] - m[c]) * r[c]; };
  const auto dz = [&](int64_t c, int64_t o) {  // the gradient at z = x̂·w + b (w, b the block's coefficients)
    const A g_out = static_cast<A>(gy[o]);
    if constexpr (!kAct) return g_out;
    const A z = xhat(c, o) * w[c] + bi[c], sig = sigmoid(z);
    return g_out * sig * (A(1) + z * (A(1) - sig));
  };
  PerChannel<double> sum_dz(b.channels), sum_dz_xhat(b.channels), sum_dx(b.channels);
  channel_sums<kNCHW>(b, dz, sum_dz.data());
  channel_sums<kNCHW>(b, [&](int64_t c, int64_t o) { return dz(c, o) * xhat(c, o); }, sum_dz_xhat.data());
  PerChannel<double> w_dz(b.channels), w_dz_xhat(b.channels);  // summed over a group: Σ dx̂ and Σ dx̂·x̂
  for (int64_t c = 0; c < b.channels; ++c) {
    w_dz[c] = w[c] * sum_dz[c];
    w_dz_xhat[c] = w[c] * sum_dz_xhat[c];
  }
  const PerChannel<A> mean_dxhat = group_means<A>(b, w_dz), mean_dxhat_xhat = group_means<A>(b, w_dz_xhat);
  const A *m1 = mean_dxhat.data(), *m2 = mean_dxhat_xhat.data();
  // grad_x = rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)), written while its channel sums (grad_add) are taken
  channel_sums<kNCHW>(b, [&](int64_t c, int64_t o) {
    const A dx = r[c] * (w[c] * dz(c, o) - m1[c] - xhat(c, o) * m2[c]);
    gx[o] = static_cast<T>(dx);
    return dx;
  }, sum_dx.data());
  for (int64_t c = 0; c < b.channels; ++c) {
    const int64_t i = b.n * s.channels + b.c0 + c;
    out.dz[i] = static_cast<A>(sum_dz[c]);
    out.dz_xhat[i] = static_cast<A>(sum_dz_xhat[c]);
    out.grad_add[i] = static_cast<A>(sum_dx[c]);
  }
}

// Calls f(nchw, act, block) for every block in parallel, with nchw = s.nchw and act as
// std::integral_constant<bool, ...> to be used as template arguments.
template <typename F>
void for_each_block(const GroupNormShape& s, bool act, const F& f) {
  with_flag(s.nchw, [&](auto nchw) {
    with_flag(act, [&](auto kact) {
      const int64_t groups = groups_per_block(s), elements = groups * s.group_channels() * s.hw;
      at::parallel_for(0, s.batch * s.groups / groups, std::max<int64_t>(1, kGrain / elements),
                       [&](int64_t begin, int64_t end) {
                         for (int64_t i = begin; i < end; ++i) f(nchw, kact, block_of(s, i));
                       });
    });
  });
}

template <typename T>
GroupNormArgs<T, at::opmath_type<T>> args_of(const GroupNormInputs& in, const at::Tensor& mean, const at::Tensor& rstd) {
  using A = at::opmath_type<T>;
  return {in.x.const_data_ptr<T>(), in.weight.const_data_ptr<T>(), in.bias.const_data_ptr<T>(),
          data_or_null<T>(in.add), data_or_null<T>(in.scale), data_or_null<T>(in.shift), mean.data_ptr<A>(),
          rstd.data_ptr<A>()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                                                                   const at::Tensor& bias,
                                                                   const std::optional<at::Tensor>& add,
                                                                   const std::optional<at::Tensor>& scale,
                                                                   const std::optional<at::Tensor>& shift,
                                                                   int64_t num_groups, double eps, bool act) {
  const GroupNormInputs in =
      prepare_inputs("ddpm_fast::group_norm_silu", x_in, weight, bias, add, scale, shift, num_groups);
  const GroupNormShape& s = in.shape;
  TORCH_CHECK(in.x.device().is_cpu(), "ddpm_fast::group_norm_silu (CPU kernel): x on ", in.x.device());
  at::Tensor y, mean, rstd;
  std::tie(y, mean, rstd) = empty_outputs(in.x, s);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "group_norm_silu_cpu", [&] {
    const auto args = args_of<scalar_t>(in, mean, rstd);
    scalar_t* out = y.data_ptr<scalar_t>();
    with_flag(args.add != nullptr, [&](auto kadd) {
      for_each_block(s, act, [&](auto nchw, auto kact, const Block& b) {
        forward_block<scalar_t, decltype(nchw)::value, decltype(kact)::value, decltype(kadd)::value>(s, b, args, out,
                                                                                                    eps);
      });
    });
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_silu_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& add, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift, const at::Tensor& mean, const at::Tensor& rstd, int64_t num_groups,
    bool act) {
  constexpr const char* op = "ddpm_fast::group_norm_silu_backward";
  const GroupNormInputs in = prepare_inputs(op, x_in, weight, bias, add, scale, shift, num_groups);
  const GroupNormShape& s = in.shape;
  check_backward_args(op, grad_y, in.x, mean, rstd, s);
  TORCH_CHECK(in.x.device().is_cpu(), op, " (CPU kernel): x on ", in.x.device());
  const at::Tensor gy = like_layout(grad_y, s), grad_x = at::empty_like(in.x);
  const auto options = mean.options();
  const at::Tensor sum_dz = at::empty({s.batch, s.channels}, options), sum_dz_xhat = at::empty_like(sum_dz),
                   grad_add = at::empty_like(sum_dz);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "group_norm_silu_backward_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const BackwardSums<A> sums{sum_dz.data_ptr<A>(), sum_dz_xhat.data_ptr<A>(), grad_add.data_ptr<A>()};
    const auto args = args_of<scalar_t>(in, mean, rstd);
    const scalar_t* g_out = gy.const_data_ptr<scalar_t>();
    scalar_t* g_in = grad_x.data_ptr<scalar_t>();
    for_each_block(s, act, [&](auto nchw, auto kact, const Block& b) {
      backward_block<scalar_t, decltype(nchw)::value, decltype(kact)::value>(s, b, args, g_out, g_in, sums);
    });
  });
  return {grad_x, sum_dz, sum_dz_xhat, grad_add};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) {
  m.impl("group_norm_silu", &group_norm_silu_cpu);
  m.impl("group_norm_silu_backward", &group_norm_silu_backward_cpu);
}

}  // namespace ddpm_fast
