// The autograd of the fused GroupNorm + SiLU (DESIGN §5.2), for every device: the forward op below
// autograd, its backward through ddpm_fast::group_norm_silu_backward (the CPU kernel, or on CUDA
// tensors the Triton one registered in ddpm_fast/ops/group_norm_silu.py). In C++ so that a call
// costs one dispatch: a Python autograd kernel added ~5 µs to every call, as long as the whole
// kernel at the U-Net's 4×4 shapes; with no gradient wanted (grad mode off, or no input that
// requires one) it records nothing and goes straight to the kernel.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace ddpm_fast {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Optional = std::optional<at::Tensor>;

Outputs forward_op(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const Optional& add,
                   const Optional& scale, const Optional& shift, int64_t num_groups, double eps, bool act) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("ddpm_fast::group_norm_silu", "")
                             .typed<Outputs(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Optional&,
                                            const Optional&, const Optional&, int64_t, double, bool)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(x, weight, bias, add, scale, shift, num_groups, eps, act);
}

Optional optional_of(const at::Tensor& t) {
  return t.defined() ? Optional(t) : std::nullopt;
}

class GroupNormSilu : public torch::autograd::Function<GroupNormSilu> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                const at::Tensor& weight, const at::Tensor& bias, const Optional& add,
                                                const Optional& scale, const Optional& shift, int64_t num_groups,
                                                double eps, bool act) {
    auto [y, mean, rstd] = forward_op(x, weight, bias, add, scale, shift, num_groups, eps, act);
    ctx->save_for_backward({x, weight, bias, add.value_or(at::Tensor()), scale.value_or(at::Tensor()),
                            shift.value_or(at::Tensor()), mean, rstd});
    ctx->saved_data["num_groups"] = num_groups;
    ctx->saved_data["act"] = act;
    ctx->mark_non_differentiable({mean, rstd});
    return {y, mean, rstd};
  }

  // (grad_x, grad_weight, grad_bias, grad_add, grad_scale, grad_shift) from the backward's per-(n, c)
  // sums Σ dz and Σ dz·x̂ at z = x̂·weight·(1 + scale) + bias·(1 + scale) + shift, by the chain rule
  // through those per-(n, c) coefficients (ddpm_fast/ops/group_norm_silu.py's affine_gradients, the same).
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("ddpm_fast::group_norm_silu_backward", "")
            .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const Optional&,
                const Optional&, const Optional&, const at::Tensor&, const at::Tensor&, int64_t, bool)>();
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &add = saved[3], &scale = saved[4],
                     &shift = saved[5];
    auto [grad_x, sum_dz, sum_dz_xhat, grad_add] =
        op.call(grads[0], x, weight, bias, optional_of(add), optional_of(scale), optional_of(shift), saved[6],
                saved[7], ctx->saved_data["num_groups"].toInt(), ctx->saved_data["act"].toBool());
    at::Tensor grad_weight, grad_bias, grad_scale;
    if (scale.defined()) {
      const auto dtype = sum_dz.scalar_type();
      const at::Tensor factor = scale.to(dtype).add(1);
      grad_weight = sum_dz_xhat.mul(factor).sum(0);
      grad_bias = sum_dz.mul(factor).sum(0);
      grad_scale = sum_dz_xhat.mul(weight.to(dtype)).add(sum_dz.mul(bias.to(dtype))).to(scale.scalar_type());
    } else {
      grad_weight = sum_dz_xhat.sum(0);
      grad_bias = sum_dz.sum(0);
    }
    return {grad_x,
            grad_weight.to(weight.scalar_type()),
            grad_bias.to(bias.scalar_type()),
            add.defined() ? grad_add.to(add.scalar_type()) : at::Tensor(),
            grad_scale,
            shift.defined() ? sum_dz.to(shift.scalar_type()) : at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor()};
  }
};

bool wants_grad(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                std::initializer_list<const Optional*> per_sample) {
  if (!at::GradMode::is_enabled()) return false;
  if (x.requires_grad() || weight.requires_grad() || bias.requires_grad()) return true;
  for (const Optional* t : per_sample) {
    if (t->has_value() && (*t)->requires_grad()) return true;
  }
  return false;
}

Outputs group_norm_silu_autograd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                 const Optional& add, const Optional& scale, const Optional& shift,
                                 int64_t num_groups, double eps, bool act) {
  if (!wants_grad(x, weight, bias, {&add, &scale, &shift})) {
    return forward_op(x, weight, bias, add, scale, shift, num_groups, eps, act);
  }
  const auto out = GroupNormSilu::apply(x, weight, bias, add, scale, shift, num_groups, eps, act);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, Autograd, m) {
  m.impl("group_norm_silu", &group_norm_silu_autograd);
}

}  // namespace ddpm_fast
