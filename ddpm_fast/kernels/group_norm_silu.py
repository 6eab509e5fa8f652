"""Triton kernels of the fused GroupNorm + SiLU (DESIGN §5), forward and backward.

    y = act((x + add[n, c] − mean[n, g])·rstd[n, g]·weight[c] + bias[c]),  act = SiLU or identity

One program per (n, group) works on a [BLOCK_C, BLOCK_P] tile: the group's channels by a run
of its H·W positions, addressed through x's four strides, so NCHW, channels_last and strided
views all take the same path. When the whole group fits in ON_CHIP_ELEMENTS, the tile holds
it: x is read once, y written once (ONE_PASS). A larger group (LSUN-256: 4 channels × 65,536
positions) is swept in chunks three times: the sum, the squared deviations, the output.
Statistics are float32 whatever the input dtype (fp16 x² overflows past 65504).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements of one (n, group) kept on chip in ONE_PASS; tests lower it to reach the multi-pass path.
ON_CHIP_ELEMENTS = 8192
CHUNK_ELEMENTS = 2048  # tile size of the multi-pass sweeps


@triton.jit
def _tile(n, c, c_mask, p, HW, W, sn, sc, sh, sw):
    # offsets and mask of channels c × positions p of sample n under strides (sn, sc, sh, sw)
    h = p // W
    w = p % W
    offsets = n * sn + c[:, None] * sc + h[None, :] * sh + w[None, :] * sw
    return offsets, c_mask[:, None] & (p[None, :] < HW)


@triton.jit
def _group(pid, Weight, Bias, C, HW, G, BLOCK_C: tl.constexpr):
    # (n, the group's channels c, their mask, its element count, weight[c], bias[c]) of program pid
    group_channels = C // G
    c = (pid % G) * group_channels + tl.arange(0, BLOCK_C)
    c_mask = tl.arange(0, BLOCK_C) < group_channels
    weight = tl.load(Weight + c, mask=c_mask, other=0.0).to(tl.float32)
    bias = tl.load(Bias + c, mask=c_mask, other=0.0).to(tl.float32)
    return (pid // G).to(tl.int64), c, c_mask, group_channels * HW, weight, bias


@triton.jit
def _shifted(X, Add, n, c, c_mask, p, HW, W, C, sxn, sxc, sxh, sxw, HAS_ADD: tl.constexpr):
    # (x + add[n, c] as float32, zero outside the mask; mask)
    offsets, mask = _tile(n, c, c_mask, p, HW, W, sxn, sxc, sxh, sxw)
    v = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_ADD:
        v = tl.where(mask, v + tl.load(Add + n * C + c, mask=c_mask, other=0.0).to(tl.float32)[:, None], 0.0)
    return v, mask


@triton.jit
def _write(Y, y_offsets, mask, v, mean, rstd, weight, bias, ACT: tl.constexpr):
    z = (v - mean) * rstd * weight[:, None] + bias[:, None]
    if ACT:
        z = z * tl.sigmoid(z)
    tl.store(Y + y_offsets, z.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def group_norm_silu_fwd_kernel(X, Weight, Bias, Add, Y, Mean, Rstd, C, HW, W, G, eps,
                               sxn, sxc, sxh, sxw, syn, syc, syh, syw,
                               HAS_ADD: tl.constexpr, ACT: tl.constexpr, ONE_PASS: tl.constexpr,
                               BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    pid = tl.program_id(0)
    n, c, c_mask, count, weight, bias = _group(pid, Weight, Bias, C, HW, G, BLOCK_C)
    if ONE_PASS:
        p = tl.arange(0, BLOCK_P)
        v, mask = _shifted(X, Add, n, c, c_mask, p, HW, W, C, sxn, sxc, sxh, sxw, HAS_ADD)
        mean = tl.sum(tl.sum(v, axis=1), axis=0) / count
        d = tl.where(mask, v - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(tl.sum(d * d, axis=1), axis=0) / count + eps)
        y_offsets, _ = _tile(n, c, c_mask, p, HW, W, syn, syc, syh, syw)
        _write(Y, y_offsets, mask, v, mean, rstd, weight, bias, ACT)
    else:
        acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
        for p0 in range(0, HW, BLOCK_P):
            v, mask = _shifted(X, Add, n, c, c_mask, p0 + tl.arange(0, BLOCK_P), HW, W, C, sxn, sxc, sxh, sxw,
                               HAS_ADD)
            acc += v
        mean = tl.sum(tl.sum(acc, axis=1), axis=0) / count
        acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
        for p0 in range(0, HW, BLOCK_P):
            v, mask = _shifted(X, Add, n, c, c_mask, p0 + tl.arange(0, BLOCK_P), HW, W, C, sxn, sxc, sxh, sxw,
                               HAS_ADD)
            d = tl.where(mask, v - mean, 0.0)
            acc += d * d
        rstd = tl.rsqrt(tl.sum(tl.sum(acc, axis=1), axis=0) / count + eps)
        for p0 in range(0, HW, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            v, mask = _shifted(X, Add, n, c, c_mask, p, HW, W, C, sxn, sxc, sxh, sxw, HAS_ADD)
            y_offsets, _ = _tile(n, c, c_mask, p, HW, W, syn, syc, syh, syw)
            _write(Y, y_offsets, mask, v, mean, rstd, weight, bias, ACT)
    tl.store(Mean + pid, mean)
    tl.store(Rstd + pid, rstd)


@triton.jit
def _grad_z(X, Add, GradY, n, c, c_mask, p, HW, W, C, sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw, mean, rstd,
            weight, bias, HAS_ADD: tl.constexpr, ACT: tl.constexpr):
    # (x̂, dz = ∂L/∂z at z = x̂·weight + bias, mask), zero outside the mask
    v, mask = _shifted(X, Add, n, c, c_mask, p, HW, W, C, sxn, sxc, sxh, sxw, HAS_ADD)
    g_offsets, _ = _tile(n, c, c_mask, p, HW, W, sgn, sgc, sgh, sgw)
    dz = tl.load(GradY + g_offsets, mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (v - mean) * rstd, 0.0)
    if ACT:
        z = xhat * weight[:, None] + bias[:, None]
        sig = tl.sigmoid(z)
        dz = dz * sig * (1.0 + z * (1.0 - sig))
    return xhat, dz, mask


@triton.jit
def group_norm_silu_bwd_kernel(GradY, X, Weight, Bias, Add, Mean, Rstd, GradX, SumDz, SumDzXhat, GradAdd,
                               C, HW, W, G, sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw, sdn, sdc, sdh, sdw,
                               HAS_ADD: tl.constexpr, ACT: tl.constexpr, BLOCK_C: tl.constexpr,
                               BLOCK_P: tl.constexpr):
    pid = tl.program_id(0)
    n, c, c_mask, count, weight, bias = _group(pid, Weight, Bias, C, HW, G, BLOCK_C)
    mean = tl.load(Mean + pid)
    rstd = tl.load(Rstd + pid)
    acc_dz = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    acc_dz_xhat = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    for p0 in range(0, HW, BLOCK_P):
        xhat, dz, mask = _grad_z(X, Add, GradY, n, c, c_mask, p0 + tl.arange(0, BLOCK_P), HW, W, C, sxn, sxc, sxh,
                                 sxw, sgn, sgc, sgh, sgw, mean, rstd, weight, bias, HAS_ADD, ACT)
        acc_dz += dz
        acc_dz_xhat += dz * xhat
    sum_dz = tl.sum(acc_dz, axis=1)
    sum_dz_xhat = tl.sum(acc_dz_xhat, axis=1)
    mean_dxhat = tl.sum(weight * sum_dz, axis=0) / count  # dx̂ = dz·weight
    mean_dxhat_xhat = tl.sum(weight * sum_dz_xhat, axis=0) / count
    acc_dx = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    for p0 in range(0, HW, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        xhat, dz, mask = _grad_z(X, Add, GradY, n, c, c_mask, p, HW, W, C, sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw,
                                 mean, rstd, weight, bias, HAS_ADD, ACT)
        dx = tl.where(mask, rstd * (weight[:, None] * dz - mean_dxhat - xhat * mean_dxhat_xhat), 0.0)
        d_offsets, _ = _tile(n, c, c_mask, p, HW, W, sdn, sdc, sdh, sdw)
        tl.store(GradX + d_offsets, dx.to(GradX.dtype.element_ty), mask=mask)
        acc_dx += dx
    tl.store(SumDz + n * C + c, sum_dz, mask=c_mask)
    tl.store(SumDzXhat + n * C + c, sum_dz_xhat, mask=c_mask)
    tl.store(GradAdd + n * C + c, tl.sum(acc_dx, axis=1), mask=c_mask)


def _blocks(x: torch.Tensor, num_groups: int) -> tuple[int, int, bool]:
    # (BLOCK_C, BLOCK_P, ONE_PASS) for the groups of x
    block_c = triton.next_power_of_2(x.shape[1] // num_groups)
    block_hw = triton.next_power_of_2(x.shape[2] * x.shape[3])
    if block_c * block_hw <= ON_CHIP_ELEMENTS:
        return block_c, block_hw, True
    return block_c, min(block_hw, max(1, CHUNK_ELEMENTS // block_c)), False


def _num_warps(block_c: int, block_p: int) -> int:
    return 8 if block_c * block_p >= 4096 else 4


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, add: torch.Tensor | None, y: torch.Tensor,
            mean: torch.Tensor, rstd: torch.Tensor, num_groups: int, eps: float, act: bool) -> None:
    """Launch the forward kernel into y (x's dense layout), mean and rstd ([N, G] float32);
    weight, bias and add contiguous."""
    N, C, H, W = x.shape
    block_c, block_p, one_pass = _blocks(x, num_groups)
    group_norm_silu_fwd_kernel[(N * num_groups,)](
        x, weight, bias, add if add is not None else x, y, mean, rstd, C, H * W, W, num_groups, eps,
        *x.stride(), *y.stride(), HAS_ADD=add is not None, ACT=act, ONE_PASS=one_pass, BLOCK_C=block_c,
        BLOCK_P=block_p, num_warps=_num_warps(block_c, block_p))


def backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
             add: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor, grad_x: torch.Tensor,
             sum_dz: torch.Tensor, sum_dz_xhat: torch.Tensor, grad_add: torch.Tensor, num_groups: int,
             act: bool) -> None:
    """Launch the backward kernel into grad_x (x's dense layout) and the [N, C] sums."""
    N, C, H, W = x.shape
    block_c, block_p, _ = _blocks(x, num_groups)  # two sweeps over the group either way
    group_norm_silu_bwd_kernel[(N * num_groups,)](
        grad_y, x, weight, bias, add if add is not None else x, mean, rstd, grad_x, sum_dz, sum_dz_xhat, grad_add,
        C, H * W, W, num_groups, *x.stride(), *grad_y.stride(), *grad_x.stride(), HAS_ADD=add is not None,
        ACT=act, BLOCK_C=block_c, BLOCK_P=block_p, num_warps=_num_warps(block_c, block_p))
