"""Triton kernels of the fused GroupNorm + SiLU (DESIGN §5), forward and backward.

    y = act(x̂·weight[c]·(1 + scale[n, c]) + bias[c]·(1 + scale[n, c]) + shift[n, c]),  act = SiLU or identity,
    x̂ = (x + add[n, c] − mean[n, g])·rstd[n, g]

One program per (n, group) works on a [BLOCK_C, BLOCK_P] tile: the group's channels by a run
of its H·W positions, addressed through x's four strides, so NCHW, channels_last and strided
views all take the same path. When the whole group fits in ON_CHIP_ELEMENTS, the tile holds
it: x is read once, y written once (ONE_PASS). A larger group (LSUN-256: 4 channels × 65,536
positions; or more than CHUNK_ELEMENTS channels) is swept in BLOCK_C × BLOCK_P chunks three times: the
sum, the squared deviations, the output.
Statistics are float32 whatever the input dtype (fp16 x² overflows past 65504). The add, the scale,
the shift and the SiLU are run-time flags (0 or 1), not constexprs: a uniform branch costs nothing in
this memory-bound kernel, and it keeps the configs few enough to compile every one (DESIGN §5.5). The
scale-shift folds into each channel chunk's coefficients (_channels), once a chunk, not an element.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import TYPES as _TYPES, capability as _capability

# Elements of one (n, group) kept on chip in ONE_PASS; tests lower it to reach the multi-pass path.
ON_CHIP_ELEMENTS = 8192
CHUNK_ELEMENTS = 1024  # tile of the multi-pass sweeps and the backward (2048 spilled 8–40 B a thread)
# A tile is padded to at least one element per thread of a 4-warp program: Triton replicates a
# smaller one across the idle threads, so it costs the same and would only add configs.
MIN_TILE_ELEMENTS = 128


@triton.jit
def _tile(n, c, c_mask, p, HW, W, sn, sc, sh, sw):
    # offsets and mask of channels c × positions p of sample n under strides (sn, sc, sh, sw), in
    # int64 (DESIGN §5.5): c·sc alone passes 2³¹ in a large NCHW sample (c = 32,768, sc = 65,536)
    h = (p // W).to(tl.int64)
    w = (p % W).to(tl.int64)
    offsets = n * sn + c.to(tl.int64)[:, None] * sc + h[None, :] * sh + w[None, :] * sw
    return offsets, c_mask[:, None] & (p[None, :] < HW)


@triton.jit
def _count(C, G, HW):
    # (channels of a group, its elements as int64: C/G·H·W passes 2³¹ in a large group)
    group_channels = C // G
    return group_channels, group_channels.to(tl.int64) * HW


@triton.jit
def _per_sample(P, nc, c_mask):
    # P[n, c] as float32 for the channel chunk's offsets nc = n·C + c
    return tl.load(P + nc, mask=c_mask, other=0.0).to(tl.float32)


@triton.jit
def _channels(pid, c0, Weight, Bias, Scale, Shift, C, G, HAS_SCALE, HAS_SHIFT, BLOCK_C: tl.constexpr):
    # (channels c0 … c0 + BLOCK_C − 1 of program pid's group, their mask, and their affine's
    # coefficients w = weight[c]·(1 + scale[n, c]), b = bias[c]·(1 + scale[n, c]) + shift[n, c])
    group_channels = C // G
    offs = c0 + tl.arange(0, BLOCK_C)
    c = (pid % G) * group_channels + offs
    c_mask = offs < group_channels
    weight = tl.load(Weight + c, mask=c_mask, other=0.0).to(tl.float32)
    bias = tl.load(Bias + c, mask=c_mask, other=0.0).to(tl.float32)
    nc = (pid // G).to(tl.int64) * C + c
    if HAS_SCALE:
        factor = 1.0 + _per_sample(Scale, nc, c_mask)
        weight = weight * factor
        bias = bias * factor
    if HAS_SHIFT:
        bias = bias + _per_sample(Shift, nc, c_mask)
    return c, c_mask, weight, bias


@triton.jit
def _shifted(X, Add, n, c, c_mask, p, HW, W, C, sxn, sxc, sxh, sxw, HAS_ADD):
    # (x + add[n, c] as float32, zero outside the mask; mask)
    offsets, mask = _tile(n, c, c_mask, p, HW, W, sxn, sxc, sxh, sxw)
    v = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_ADD:
        v = tl.where(mask, v + tl.load(Add + n * C + c, mask=c_mask, other=0.0).to(tl.float32)[:, None], 0.0)
    return v, mask


@triton.jit
def _write(Y, y_offsets, mask, v, mean, rstd, weight, bias, ACT):
    z = (v - mean) * rstd * weight[:, None] + bias[:, None]
    if ACT:
        z = z * tl.sigmoid(z)
    tl.store(Y + y_offsets, z.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def group_norm_silu_fwd_kernel(X, Weight, Bias, Add, Scale, Shift, Y, Mean, Rstd, C, HW, W, G, eps,
                               sxn, sxc, sxh, sxw, syn, syc, syh, syw, HAS_ADD, HAS_SCALE, HAS_SHIFT, ACT,
                               ONE_PASS: tl.constexpr,
                               BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    pid = tl.program_id(0)
    n = (pid // G).to(tl.int64)
    group_channels, count = _count(C, G, HW)
    if ONE_PASS:
        c, c_mask, weight, bias = _channels(pid, 0, Weight, Bias, Scale, Shift, C, G, HAS_SCALE, HAS_SHIFT, BLOCK_C)
        p = tl.arange(0, BLOCK_P)
        v, mask = _shifted(X, Add, n, c, c_mask, p, HW, W, C, sxn, sxc, sxh, sxw, HAS_ADD)
        mean = tl.sum(tl.sum(v, axis=1), axis=0) / count
        d = tl.where(mask, v - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(tl.sum(d * d, axis=1), axis=0) / count + eps)
        y_offsets, _ = _tile(n, c, c_mask, p, HW, W, syn, syc, syh, syw)
        _write(Y, y_offsets, mask, v, mean, rstd, weight, bias, ACT)
    else:  # three sweeps of BLOCK_C × BLOCK_P chunks over the group's channels and positions
        acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
        for c0 in range(0, group_channels, BLOCK_C):
            c, c_mask, weight, bias = _channels(pid, c0, Weight, Bias, Scale, Shift, C, G, HAS_SCALE, HAS_SHIFT, BLOCK_C)
            for p0 in range(0, HW, BLOCK_P):
                v, mask = _shifted(X, Add, n, c, c_mask, p0 + tl.arange(0, BLOCK_P), HW, W, C, sxn, sxc, sxh, sxw,
                                   HAS_ADD)
                acc += v
        mean = tl.sum(tl.sum(acc, axis=1), axis=0) / count
        acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
        for c0 in range(0, group_channels, BLOCK_C):
            c, c_mask, weight, bias = _channels(pid, c0, Weight, Bias, Scale, Shift, C, G, HAS_SCALE, HAS_SHIFT, BLOCK_C)
            for p0 in range(0, HW, BLOCK_P):
                v, mask = _shifted(X, Add, n, c, c_mask, p0 + tl.arange(0, BLOCK_P), HW, W, C, sxn, sxc, sxh, sxw,
                                   HAS_ADD)
                d = tl.where(mask, v - mean, 0.0)
                acc += d * d
        rstd = tl.rsqrt(tl.sum(tl.sum(acc, axis=1), axis=0) / count + eps)
        for c0 in range(0, group_channels, BLOCK_C):
            c, c_mask, weight, bias = _channels(pid, c0, Weight, Bias, Scale, Shift, C, G, HAS_SCALE, HAS_SHIFT, BLOCK_C)
            for p0 in range(0, HW, BLOCK_P):
                p = p0 + tl.arange(0, BLOCK_P)
                v, mask = _shifted(X, Add, n, c, c_mask, p, HW, W, C, sxn, sxc, sxh, sxw, HAS_ADD)
                y_offsets, _ = _tile(n, c, c_mask, p, HW, W, syn, syc, syh, syw)
                _write(Y, y_offsets, mask, v, mean, rstd, weight, bias, ACT)
    tl.store(Mean + pid, mean)
    tl.store(Rstd + pid, rstd)


@triton.jit
def _grad_z(X, Add, GradY, n, c, c_mask, p, HW, W, C, sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw, mean, rstd,
            weight, bias, HAS_ADD, ACT):
    # (x̂, dz = ∂L/∂z at z = x̂·weight + bias, mask), zero outside the mask (weight, bias: _channels')
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
def group_norm_silu_bwd_kernel(GradY, X, Weight, Bias, Add, Scale, Shift, Mean, Rstd, GradX, SumDz, SumDzXhat,
                               GradAdd, C, HW, W, G, sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw, sdn, sdc, sdh, sdw,
                               HAS_ADD, HAS_SCALE, HAS_SHIFT, ACT, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    # two sweeps of BLOCK_C × BLOCK_P chunks over the group (one chunk when the group fits)
    pid = tl.program_id(0)
    n = (pid // G).to(tl.int64)
    group_channels, count = _count(C, G, HW)
    mean = tl.load(Mean + pid)
    rstd = tl.load(Rstd + pid)
    dxhat_total = 0.0  # Σ dx̂ and Σ dx̂·x̂ over the group, dx̂ = dz·w (w: _channels' coefficient)
    dxhat_xhat_total = 0.0
    for c0 in range(0, group_channels, BLOCK_C):
        c, c_mask, weight, bias = _channels(pid, c0, Weight, Bias, Scale, Shift, C, G, HAS_SCALE, HAS_SHIFT, BLOCK_C)
        acc_dz = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
        acc_dz_xhat = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
        for p0 in range(0, HW, BLOCK_P):
            xhat, dz, mask = _grad_z(X, Add, GradY, n, c, c_mask, p0 + tl.arange(0, BLOCK_P), HW, W, C, sxn, sxc,
                                     sxh, sxw, sgn, sgc, sgh, sgw, mean, rstd, weight, bias, HAS_ADD, ACT)
            acc_dz += dz
            acc_dz_xhat += dz * xhat
        sum_dz = tl.sum(acc_dz, axis=1)
        sum_dz_xhat = tl.sum(acc_dz_xhat, axis=1)
        tl.store(SumDz + n * C + c, sum_dz, mask=c_mask)
        tl.store(SumDzXhat + n * C + c, sum_dz_xhat, mask=c_mask)
        dxhat_total += tl.sum(weight * sum_dz, axis=0)
        dxhat_xhat_total += tl.sum(weight * sum_dz_xhat, axis=0)
    mean_dxhat = dxhat_total / count
    mean_dxhat_xhat = dxhat_xhat_total / count
    for c0 in range(0, group_channels, BLOCK_C):
        c, c_mask, weight, bias = _channels(pid, c0, Weight, Bias, Scale, Shift, C, G, HAS_SCALE, HAS_SHIFT, BLOCK_C)
        acc_dx = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
        for p0 in range(0, HW, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            xhat, dz, mask = _grad_z(X, Add, GradY, n, c, c_mask, p, HW, W, C, sxn, sxc, sxh, sxw, sgn, sgc, sgh,
                                     sgw, mean, rstd, weight, bias, HAS_ADD, ACT)
            dx = tl.where(mask, rstd * (weight[:, None] * dz - mean_dxhat - xhat * mean_dxhat_xhat), 0.0)
            d_offsets, _ = _tile(n, c, c_mask, p, HW, W, sdn, sdc, sdh, sdw)
            tl.store(GradX + d_offsets, dx.to(GradX.dtype.element_ty), mask=mask)
            acc_dx += dx
        tl.store(GradAdd + n * C + c, tl.sum(acc_dx, axis=1), mask=c_mask)


def _blocks(shape: tuple[int, ...], num_groups: int, on_chip: int) -> tuple[int, int, bool]:
    # (BLOCK_C, BLOCK_P, whole group in one tile) for the groups of an [N, C, H, W] input
    block_c = triton.next_power_of_2(shape[1] // num_groups)
    block_hw = triton.next_power_of_2(shape[2] * shape[3])
    if block_c * block_hw <= on_chip:
        return block_c, max(block_hw, MIN_TILE_ELEMENTS // block_c), True
    block_c = min(block_c, CHUNK_ELEMENTS)  # wider groups are swept in channel chunks too
    return block_c, min(block_hw, CHUNK_ELEMENTS // block_c), False


def _num_warps(block_c: int, block_p: int) -> int:
    # 8 warps from CHUNK_ELEMENTS up: with 4 (and maxnreg = 255), the backward's 1024-element
    # tiles took up to 197 registers a thread, 2 programs (8 warps) an SM; with 8, at most 117
    return 8 if block_c * block_p >= CHUNK_ELEMENTS else 4


# An explicit register limit: without one, ptxas, which knows the block size, cut registers to an
# occupancy step by spilling 8 B a thread in a few tiles on some targets (DESIGN §8); under a limit
# it spills only what the limit forces, and 255, the most a thread can have, forces none here.
MAX_REGISTERS = 255


def _config(backward: bool, dtype: torch.dtype, block_c: int, block_p: int, one_pass: bool) -> dict:
    t = "*" + _TYPES[dtype]
    flags = dict(HAS_ADD="i32", HAS_SCALE="i32", HAS_SHIFT="i32", ACT="i32")  # 0 or 1 (_per_sample_args)
    if backward:
        kernel, name = group_norm_silu_bwd_kernel, "bwd"
        scalars = dict(GradY=t, X=t, Weight=t, Bias=t, Add=t, Scale=t, Shift=t, Mean="*fp32", Rstd="*fp32", GradX=t, SumDz="*fp32",
                       SumDzXhat="*fp32", GradAdd="*fp32", C="i32", HW="i32", W="i32", G="i32",
                       **dict.fromkeys(("sxn", "sxc", "sxh", "sxw", "sgn", "sgc", "sgh", "sgw", "sdn", "sdc", "sdh",
                                        "sdw"), "i32"), **flags)
        constexprs = dict(BLOCK_C=block_c, BLOCK_P=block_p)
    else:
        kernel, name = group_norm_silu_fwd_kernel, "fwd_one_pass" if one_pass else "fwd_three_pass"
        scalars = dict(X=t, Weight=t, Bias=t, Add=t, Scale=t, Shift=t, Y=t, Mean="*fp32", Rstd="*fp32", C="i32", HW="i32", W="i32",
                       G="i32", eps="fp32",
                       **dict.fromkeys(("sxn", "sxc", "sxh", "sxw", "syn", "syc", "syh", "syw"), "i32"), **flags)
        constexprs = dict(ONE_PASS=one_pass, BLOCK_C=block_c, BLOCK_P=block_p)
    return dict(kernel=kernel, signature={**scalars, **dict.fromkeys(constexprs, "constexpr")}, constexprs=constexprs,
                num_warps=_num_warps(block_c, block_p), num_stages=3, maxnreg=MAX_REGISTERS,
                name=f"group_norm_silu_{name}_{_TYPES[dtype]}_{block_c}x{block_p}")


def _tiles(on_chip: int) -> list[tuple[int, int, bool]]:
    # every (BLOCK_C, BLOCK_P, whole group) _blocks can return for this on-chip limit
    powers = [1 << i for i in range(on_chip.bit_length())]
    return sorted({(c, p, True) for c in powers for p in powers if MIN_TILE_ELEMENTS <= c * p <= on_chip}
                  | {(c, CHUNK_ELEMENTS // c, False) for c in powers if c <= CHUNK_ELEMENTS})


def launch_configs(capability: tuple[int, int]) -> list[dict]:
    """Every config the launchers can choose (the same on every GPU: no dots, little shared memory).
    The backward sweeps twice whatever the group's size, in tiles of at most CHUNK_ELEMENTS (an
    ON_CHIP_ELEMENTS tile spilled there: 784 B a thread on sm_90)."""
    backward_tiles = sorted({(c, p) for c, p, _ in _tiles(CHUNK_ELEMENTS)})
    return ([_config(False, dtype, c, p, one_pass) for dtype in _TYPES for c, p, one_pass in _tiles(ON_CHIP_ELEMENTS)]
            + [_config(True, dtype, c, p, False) for dtype in _TYPES for c, p in backward_tiles])


def select(shape: tuple[int, int, int, int], num_groups: int, dtype: torch.dtype, backward: bool,
           capability: tuple[int, int]) -> dict:
    """The launchers' config for an [N, C, H, W] input (pure: tests call it without a GPU)."""
    block_c, block_p, one_pass = _blocks(shape, num_groups, CHUNK_ELEMENTS if backward else ON_CHIP_ELEMENTS)
    return _config(backward, dtype, block_c, block_p, one_pass and not backward)


def _per_sample_args(x: torch.Tensor, add, scale, shift, act: bool) -> tuple[tuple, tuple[int, ...]]:
    # ((Add, Scale, Shift) with x standing in for an absent one, which its flag keeps unread;
    # (HAS_ADD, HAS_SCALE, HAS_SHIFT, ACT) as ints: Triton 3.6's interpreter cannot take a Python
    # bool argument (it stores an i1 in an int32 array and raises), and a uniform branch on an int
    # costs the same)
    per_sample = (add, scale, shift)
    return tuple(x if t is None else t for t in per_sample), (*(int(t is not None) for t in per_sample), int(act))


def _launch_options(config: dict) -> dict:
    return dict(**config["constexprs"], num_warps=config["num_warps"], num_stages=config["num_stages"],
                maxnreg=config["maxnreg"])


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, add: torch.Tensor | None,
            scale: torch.Tensor | None, shift: torch.Tensor | None, y: torch.Tensor, mean: torch.Tensor,
            rstd: torch.Tensor, num_groups: int, eps: float, act: bool) -> None:
    """Launch the forward kernel into y (x's dense layout), mean and rstd ([N, G] float32);
    weight, bias, add, scale and shift contiguous."""
    N, C, H, W = x.shape
    config = select(x.shape, num_groups, x.dtype, False, _capability(x))
    per_sample, flags = _per_sample_args(x, add, scale, shift, act)
    group_norm_silu_fwd_kernel[(N * num_groups,)](
        x, weight, bias, *per_sample, y, mean, rstd, C, H * W, W, num_groups, eps, *x.stride(), *y.stride(), *flags,
        **_launch_options(config))


def backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
             add: torch.Tensor | None, scale: torch.Tensor | None, shift: torch.Tensor | None, mean: torch.Tensor,
             rstd: torch.Tensor, grad_x: torch.Tensor, sum_dz: torch.Tensor, sum_dz_xhat: torch.Tensor,
             grad_add: torch.Tensor, num_groups: int, act: bool) -> None:
    """Launch the backward kernel into grad_x (x's dense layout) and the [N, C] sums."""
    N, C, H, W = x.shape
    config = select(x.shape, num_groups, x.dtype, True, _capability(x))
    per_sample, flags = _per_sample_args(x, add, scale, shift, act)
    group_norm_silu_bwd_kernel[(N * num_groups,)](
        grad_y, x, weight, bias, *per_sample, mean, rstd, grad_x, sum_dz, sum_dz_xhat, grad_add, C, H * W, W,
        num_groups, *x.stride(), *grad_y.stride(), *grad_x.stride(), *flags, **_launch_options(config))
