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

Outputs forward_op(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                   const std::optional<at::Tensor>& add, int64_t num_groups, double eps, bool act) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("ddpm_fast::group_norm_silu", "")
                             .typed<Outputs(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            const std::optional<at::Tensor>&, int64_t, double, bool)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(x, weight, bias, add, num_groups, eps, act);
}

class GroupNormSilu : public torch::autograd::Function<GroupNormSilu> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                const at::Tensor& weight, const at::Tensor& bias,
                                                const std::optional<at::Tensor>& add, int64_t num_groups,
                                                double eps, bool act) {
    auto [y, mean, rstd] = forward_op(x, weight, bias, add, num_groups, eps, act);
    ctx->save_for_backward({x, weight, bias, add.value_or(at::Tensor()), mean, rstd});
    ctx->saved_data["num_groups"] = num_groups;
    ctx->saved_data["act"] = act;
    ctx->mark_non_differentiable({mean, rstd});
    return {y, mean, rstd};
  }

  // (grad_x, grad_weight, grad_bias, grad_add): weight and bias gradients are the backward's
  // per-(n, c) sums summed over the batch.
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("ddpm_fast::group_norm_silu_backward", "")
            .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, int64_t, bool)>();
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &add = saved[3];
    const std::optional<at::Tensor> add_opt = add.defined() ? std::optional<at::Tensor>(add) : std::nullopt;
    auto [grad_x, sum_dz, sum_dz_xhat, grad_add] =
        op.call(grads[0], x, weight, bias, add_opt, saved[4], saved[5], ctx->saved_data["num_groups"].toInt(),
                ctx->saved_data["act"].toBool());
    return {grad_x,
            sum_dz_xhat.sum(0).to(weight.scalar_type()),
            sum_dz.sum(0).to(bias.scalar_type()),
            add.defined() ? grad_add.to(add.scalar_type()) : at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor()};
  }
};

bool wants_grad(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                const std::optional<at::Tensor>& add) {
  return at::GradMode::is_enabled() && (x.requires_grad() || weight.requires_grad() || bias.requires_grad() ||
                                        (add.has_value() && add->requires_grad()));
}

Outputs group_norm_silu_autograd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                 const std::optional<at::Tensor>& add, int64_t num_groups, double eps, bool act) {
  if (!wants_grad(x, weight, bias, add)) return forward_op(x, weight, bias, add, num_groups, eps, act);
  const auto out = GroupNormSilu::apply(x, weight, bias, add, num_groups, eps, act);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, Autograd, m) {
  m.impl("group_norm_silu", &group_norm_silu_autograd);
}

}  // namespace ddpm_fast
