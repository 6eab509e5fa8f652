"""group_norm_silu: GroupNorm with the ResBlock's time-embedding add, guided-diffusion's scale-shift
and SiLU in one op (DESIGN §5), forward and backward, and every registration of it. Backends: Triton
(ddpm_fast/kernels/group_norm_silu.py), CUDA and CPU C++ (csrc/{cuda,cpu}/group_norm_silu.*),
and the reference (ddpm_fast/reference/group_norm_silu.py).

Every fast backend returns (y, mean, rstd) with the per-(n, group) statistics kept for its
backward, which gives grad_x plus per-(n, c) sums at the affine output z, from which the weight,
bias, scale and shift gradients follow (affine_gradients). The C++ op's backward on CUDA tensors is the Triton backward kernel; its
autograd is registered in C++ (csrc/autograd/group_norm_silu.cpp, DESIGN §5.2)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import _extension
from ..reference.group_norm_silu import group_norm_silu as reference_group_norm_silu
from ._dispatch import resolve

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def group_norm_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int, eps: float = 1e-6,
                    add: torch.Tensor | None = None, act: bool = True, impl: str = "auto", *,
                    scale: torch.Tensor | None = None, shift: torch.Tensor | None = None) -> torch.Tensor:
    """act((GroupNorm(x + add[:, :, None, None]) · weight + bias) · (1 + scale) + shift), act = SiLU
    (act=True) or identity; scale and shift per (n, c) are guided-diffusion's ResBlock with
    use_scale_shift_norm (its out_norm(h) · (1 + scale) + shift), absent ones 0.

    x: [N, C, H, W] float32/float16/bfloat16 (float64 on the reference and C++ paths), NCHW,
    channels_last or any strides; weight, bias: [C]; add, scale, shift: [N, C] or None; all of x's
    dtype and device. Statistics are float32 (float64 for float64 x), and so is the whole affine
    and the SiLU, rounded once to x's dtype (guided-diffusion's GroupNorm32 normalises in float32
    too). The output has x's memory format (NCHW for strided views). Differentiable in x, weight,
    bias, add, scale and shift on every backend."""
    _check(x, weight, bias, num_groups, eps, add, scale, shift)
    backend = resolve("group_norm_silu", impl, x.device, _IMPLEMENTATIONS)
    return _IMPLEMENTATIONS[backend](x, weight, bias, add, scale, shift, num_groups, float(eps), bool(act))


def _check(x, weight, bias, num_groups, eps, add, scale, shift) -> None:
    # every call passes through here, so x's attributes are read once (a 4×4 U-Net norm's
    # kernel takes about as long as this function did when it read each of them per test)
    name = "group_norm_silu"
    shape, dtype, device = x.shape, x.dtype, x.device
    if len(shape) != 4:
        raise ValueError(f"{name}: x must be 4-D [N, C, H, W], got {len(shape)}-D {tuple(shape)}")
    if dtype not in _DTYPES:
        raise TypeError(f"{name}: x must be float32, float16, bfloat16 or float64, got {dtype}")
    if 0 in shape:
        raise ValueError(f"{name}: x must not be empty, got shape {tuple(shape)}")
    N, C = shape[:2]
    if not isinstance(num_groups, int) or num_groups <= 0 or C % num_groups:
        raise ValueError(f"{name}: the channel count C = {C} must be divisible by num_groups, got "
                         f"num_groups = {num_groups!r}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{name}: eps must be a finite number ≥ 0, got {eps!r}")
    params = (("weight", weight, (C,)), ("bias", bias, (C,)), ("add", add, (N, C)), ("scale", scale, (N, C)),
              ("shift", shift, (N, C)))
    for what, t, want in (p for p in params if p[1] is not None):
        if t.shape != want:
            raise ValueError(f"{name}: {what} must have shape {want} for x of shape {tuple(shape)}, "
                             f"got {tuple(t.shape)}")
        if t.dtype != dtype:
            raise TypeError(f"{name}: {what} must have x's dtype {dtype}, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name}: {what} is on {t.device} but x is on {device}")


def dense(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels write their output: NCHW- or channels_last-dense as it is, else NCHW."""
    dense_layout = x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
    return x if dense_layout else x.contiguous()


def stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def forward_outputs(x: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty (y in x's dense layout, mean [N, G], rstd [N, G]): what every backend returns."""
    stats = x.new_empty((x.shape[0], num_groups), dtype=stats_dtype(x))
    return torch.empty_like(dense(x)), stats, torch.empty_like(stats)


def backward_outputs(x: torch.Tensor, mean: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Empty (grad_x in x's dense layout, Σ dz, Σ dz·x̂, grad_add [N, C] in the statistics' dtype)."""
    sums = mean.new_empty((x.shape[0], x.shape[1]))
    return torch.empty_like(dense(x)), sums, torch.empty_like(sums), torch.empty_like(sums)


def affine_gradients(weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor | None,
                     shift: torch.Tensor | None, sum_dz: torch.Tensor, sum_dz_xhat: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(grad_weight, grad_bias, grad_scale, grad_shift) from the backward's per-(n, c) sums
    Σ_hw dz and Σ_hw dz·x̂ at z = x̂·weight·(1 + scale) + bias·(1 + scale) + shift: the chain
    rule through the per-(n, c) coefficients weight·(1 + scale) and bias·(1 + scale) + shift, in
    the sums' dtype; None for an absent scale or shift. csrc/autograd/group_norm_silu.cpp is the same."""
    if scale is None:
        grad_weight, grad_bias, grad_scale = sum_dz_xhat.sum(0), sum_dz.sum(0), None
    else:
        factor = 1 + scale.to(sum_dz.dtype)
        grad_weight, grad_bias = (sum_dz_xhat * factor).sum(0), (sum_dz * factor).sum(0)
        grad_scale = (sum_dz_xhat * weight.to(sum_dz.dtype) + sum_dz * bias.to(sum_dz.dtype)).to(scale.dtype)
    grad_shift = sum_dz.to(shift.dtype) if shift is not None else None
    return grad_weight.to(weight.dtype), grad_bias.to(bias.dtype), grad_scale, grad_shift


def _per_channel(weight, bias, add, scale, shift):
    # the kernels index weight, bias as contiguous [C] and add, scale, shift as contiguous [N, C]
    return tuple(t.contiguous() if t is not None else None for t in (weight, bias, add, scale, shift))


# custom_ops rather than triton_ops: their explicit fake kernels also hold under Triton's
# interpreter (which would run a triton_op's kernel on fake tensors).
@torch.library.custom_op("ddpm_fast::group_norm_silu_triton", mutates_args=())
def group_norm_silu_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, add: Optional[torch.Tensor],
                           scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], num_groups: int, eps: float,
                           act: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels import group_norm_silu as kernels
    y, mean, rstd = forward_outputs(x, num_groups)
    kernels.forward(x, *_per_channel(weight, bias, add, scale, shift), y, mean, rstd, num_groups, eps, act)
    return y, mean, rstd


@group_norm_silu_triton.register_fake
def _(x, weight, bias, add, scale, shift, num_groups, eps, act):
    return forward_outputs(x, num_groups)


@torch.library.custom_op("ddpm_fast::group_norm_silu_backward_triton", mutates_args=())
def group_norm_silu_backward_triton(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                    add: Optional[torch.Tensor], scale: Optional[torch.Tensor],
                                    shift: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
                                    num_groups: int, act: bool
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels import group_norm_silu as kernels
    grad_x, sum_dz, sum_dz_xhat, grad_add = backward_outputs(x, mean)
    kernels.backward(grad_y, x, *_per_channel(weight, bias, add, scale, shift), mean, rstd, grad_x, sum_dz,
                     sum_dz_xhat, grad_add, num_groups, act)
    return grad_x, sum_dz, sum_dz_xhat, grad_add


@group_norm_silu_backward_triton.register_fake
def _(grad_y, x, weight, bias, add, scale, shift, mean, rstd, num_groups, act):
    return backward_outputs(x, mean)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, add, scale, shift, num_groups, eps, act = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, add, scale, shift, mean, rstd)
    ctx.num_groups, ctx.act = num_groups, act


def _autograd(backward_op):
    """The backward of a forward op returning (y, mean, rstd), through `backward_op`."""
    def backward(ctx, grad_y, grad_mean, grad_rstd):
        x, weight, bias, add, scale, shift, mean, rstd = ctx.saved_tensors
        grad_x, sum_dz, sum_dz_xhat, grad_add = backward_op(grad_y, x, weight, bias, add, scale, shift, mean, rstd,
                                                            ctx.num_groups, ctx.act)
        grad_weight, grad_bias, grad_scale, grad_shift = affine_gradients(weight, bias, scale, shift, sum_dz,
                                                                          sum_dz_xhat)
        grad_add = grad_add.to(add.dtype) if add is not None else None
        return grad_x, grad_weight, grad_bias, grad_add, grad_scale, grad_shift, None, None, None
    return backward


group_norm_silu_triton.register_autograd(_autograd(torch.ops.ddpm_fast.group_norm_silu_backward_triton),
                                         setup_context=_setup_context)

if _extension.AVAILABLE:
    @torch.library.register_fake("ddpm_fast::group_norm_silu")
    def _group_norm_silu_fake(x, weight, bias, add, scale, shift, num_groups, eps, act):
        return forward_outputs(x, num_groups)

    @torch.library.register_fake("ddpm_fast::group_norm_silu_backward")
    def _group_norm_silu_backward_fake(grad_y, x, weight, bias, add, scale, shift, mean, rstd, num_groups, act):
        return backward_outputs(x, mean)

    if _extension.cuda_built():
        # No CUDA C++ backward kernel: on CUDA tensors the C++ op's backward is the Triton one.
        torch.library.impl("ddpm_fast::group_norm_silu_backward", "CUDA")(group_norm_silu_backward_triton)


def _compiled(x, weight, bias, add, scale, shift, num_groups, eps, act):
    # the fused ops return (y, mean, rstd); the public op returns y. The C++ op makes x dense
    # itself; the overload is looked up when called, as the library may be unbuilt.
    return torch.ops.ddpm_fast.group_norm_silu.default(x, weight, bias, add, scale, shift, num_groups, eps, act)[0]


_IMPLEMENTATIONS = {  # "auto" order: Triton on CUDA tensors, the C++ op on CPU ones
    "triton": lambda x, weight, bias, add, scale, shift, num_groups, eps, act:
        torch.ops.ddpm_fast.group_norm_silu_triton(dense(x), weight, bias, add, scale, shift, num_groups, eps,
                                                   act)[0],
    "cuda": _compiled,
    "cpu": _compiled,
    "reference": lambda x, weight, bias, add, scale, shift, num_groups, eps, act: reference_group_norm_silu(
        x, weight, bias, num_groups, eps, add=add, act=act, scale=scale, shift=shift),
}
