// Fused GroupNorm + SiLU (DESIGN §5), shared by csrc/cpu/group_norm_silu.cpp and
// csrc/cuda/group_norm_silu.cu: argument checks, the dense layouts the kernels read, and
// the output and statistics tensors.
//   y = act(x̂·weight[c]·(1 + scale[n, c]) + bias[c]·(1 + scale[n, c]) + shift[n, c]),  act = SiLU or identity,
//   x̂ = (x + add[n, c] − mean[n, g])·rstd[n, g]
// (add, scale, shift optional: 0 when absent; scale and shift are guided-diffusion's use_scale_shift_norm).
// Both layouts are read through one description of an (n, group) block: NCHW keeps a channel's
// H·W positions contiguous, NHWC (channels_last) a position's channels.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "common/philox.h"  // DDPM_FAST_HD

namespace ddpm_fast {

struct GroupNormShape {
  int64_t batch, channels, hw, groups;
  bool nchw;  // else NHWC
  DDPM_FAST_HD int64_t group_channels() const { return channels / groups; }
  // offset of (n, g·C/G, 0, 0) in a dense tensor of this shape and layout
  DDPM_FAST_HD int64_t group_offset(int64_t n, int64_t g) const {
    return n * channels * hw + (nchw ? g * group_channels() * hw : g * group_channels());
  }
};

// The per-(n, c) coefficients of element i of [N, C] (n·C + c): weight·(1 + scale) and
// bias·(1 + scale) + shift from weight[c] and bias[c], unchanged where scale and shift are null.
template <typename A, typename T>
DDPM_FAST_HD void apply_scale_shift(A& weight, A& bias, const T* scale, const T* shift, int64_t i) {
  if (scale != nullptr) {
    const A factor = static_cast<A>(1) + static_cast<A>(scale[i]);
    weight *= factor;
    bias *= factor;
  }
  if (shift != nullptr) bias += static_cast<A>(shift[i]);
}

inline GroupNormShape check_group_norm_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                            const at::Tensor& bias, const std::optional<at::Tensor>& add,
                                            const std::optional<at::Tensor>& scale,
                                            const std::optional<at::Tensor>& shift, int64_t num_groups) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D [N, C, H, W], got ", x.dim(), "-D ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be a floating-point tensor, got ", x.scalar_type());
  const int64_t channels = x.size(1);
  TORCH_CHECK(num_groups > 0 && channels % num_groups == 0, op, ": C = ", channels,
              " must be divisible by num_groups = ", num_groups);
  TORCH_CHECK(x.numel() > 0, op, ": x must not be empty, got ", x.sizes());
  const auto check_param = [&](const at::Tensor& t, const char* name, at::IntArrayRef shape) {
    TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ", x.scalar_type(),
                ", got ", t.scalar_type());
    TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on x's device ", x.device(), ", got ",
                t.device());
  };
  check_param(weight, "weight", {channels});
  check_param(bias, "bias", {channels});
  if (add.has_value()) check_param(*add, "add", {x.size(0), channels});
  if (scale.has_value()) check_param(*scale, "scale", {x.size(0), channels});
  if (shift.has_value()) check_param(*shift, "shift", {x.size(0), channels});
  return {x.size(0), channels, x.size(2) * x.size(3), num_groups, x.is_contiguous()};
}

// The tensors of one call as the kernels read them: x NCHW- or NHWC-dense as it is (any other
// strides copied to NCHW), weight, bias, add, scale and shift contiguous (undefined when absent).
struct GroupNormInputs {
  at::Tensor x, weight, bias, add, scale, shift;
  GroupNormShape shape;
};

inline GroupNormInputs prepare_inputs(const char* op, const at::Tensor& x_in, const at::Tensor& weight,
                                      const at::Tensor& bias, const std::optional<at::Tensor>& add,
                                      const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
                                      int64_t num_groups) {
  const bool dense = x_in.is_contiguous() || x_in.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor x = dense ? x_in : x_in.contiguous();
  const GroupNormShape shape = check_group_norm_args(op, x, weight, bias, add, scale, shift, num_groups);
  const auto contiguous = [](const std::optional<at::Tensor>& t) {
    return t.has_value() ? t->contiguous() : at::Tensor();
  };
  return {x, weight.contiguous(), bias.contiguous(), contiguous(add), contiguous(scale), contiguous(shift), shape};
}

// t's data, or null for an undefined (absent) tensor.
template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// t (x's shape) in the dense layout of x.
inline at::Tensor like_layout(const at::Tensor& t, const GroupNormShape& s) {
  return t.contiguous(s.nchw ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast);
}

inline at::ScalarType stats_dtype(const at::Tensor& x) {
  return at::toOpMathType(x.scalar_type());
}

// (y in x's layout, mean [N, G], rstd [N, G]) to be filled by a kernel.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_outputs(const at::Tensor& x, const GroupNormShape& s) {
  const auto options = x.options().dtype(stats_dtype(x));
  return {at::empty_like(x), at::empty({s.batch, s.groups}, options), at::empty({s.batch, s.groups}, options)};
}

inline void check_backward_args(const char* op, const at::Tensor& grad_y, const at::Tensor& x,
                                const at::Tensor& mean, const at::Tensor& rstd, const GroupNormShape& s) {
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type(), op,
              ": grad_y must match x (", x.scalar_type(), " ", x.sizes(), "), got ", grad_y.scalar_type(), " ",
              grad_y.sizes());
  for (const at::Tensor* t : {&mean, &rstd}) {
    TORCH_CHECK(t->sizes() == at::IntArrayRef({s.batch, s.groups}) && t->scalar_type() == stats_dtype(x) &&
                    t->is_contiguous(),
                op, ": mean and rstd must be contiguous ", stats_dtype(x), " [", s.batch, ", ", s.groups,
                "], got ", t->scalar_type(), " ", t->sizes());
  }
}

}  // namespace ddpm_fast
