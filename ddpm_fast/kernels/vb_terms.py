"""Triton kernel of the bound's per-timestep term (DESIGN §2.6): the arithmetic of csrc/vb_terms.h.

One program per sample sweeps its elements in tiles of BLOCK, summing in float64 lanes that a
final tl.sum gathers, so a sample's result never depends on the batch. The row is read from
device memory (no host sync); the decoder's transcendental work runs only on the decoder row.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..contract import BIN_HALF_WIDTH, EDGE_BIN
from . import TYPES as _TYPES, capability as _capability
from .diffusion_step import _dims

# globals a @triton.jit function reads must be constexprs (the interpreter would accept plain floats)
INV_SQRT2 = tl.constexpr(0.70710678118654752)
LN2 = tl.constexpr(0.69314718055994531)
TWO_OVER_SQRT_PI = tl.constexpr(1.12837916709551257)
_EDGE_BIN = tl.constexpr(EDGE_BIN)
_BIN_HALF_WIDTH = tl.constexpr(BIN_HALF_WIDTH)


@triton.jit
def _log_erfc_nonneg(x):
    # log(erfc(x)), x ≥ 0: Numerical Recipes' erfcc (fractional error < 1.2e-7) in log form, never underflowing
    t = 1.0 / (1.0 + 0.5 * x)
    p = -1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806 + t * (
        0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))))
    return tl.log(t) - x * x + p


@triton.jit
def _log1p(y):  # Kahan's correction: accurate near 0 from log alone
    w = 1.0 + y
    return tl.where(w == 1.0, y, tl.log(w) * (y / (w - 1.0)))


@triton.jit
def _expm1(x):  # Kahan's correction: accurate near 0 from exp and log alone
    u = tl.exp(x)
    um1 = u - 1.0
    return tl.where(u == 1.0, x, tl.where(um1 == -1.0, -1.0, um1 * (x / tl.log(u))))


@triton.jit
def _log_normal_tail(z):  # log Q(z), Q = 1 − Φ, for any z
    small = _log_erfc_nonneg(tl.abs(z) * INV_SQRT2) - LN2
    return tl.where(z >= 0.0, small, _log1p(-tl.exp(small)))


@triton.jit
def _erf_nonneg(a):  # erf(a), a ≥ 0, relatively accurate near 0 (Taylor series below ½)
    s = a * a
    series = 1.0 - s * (1.0 / 3.0 - s * (1.0 / 10.0 - s * (1.0 / 42.0 - s * (1.0 / 216.0 - s * (1.0 / 1320.0)))))
    return tl.where(a >= 0.5, 1.0 - tl.exp(_log_erfc_nonneg(a)), TWO_OVER_SQRT_PI * a * series)


@triton.jit
def _log_normal_mass(lo, hi):
    # log of N(0, 1)'s mass on [lo, hi]: a bin below the mean is mirrored above it and taken from the
    # upper tails; one holding the mean is a sum of two erf (never 1 − 1)
    flip = hi <= 0.0
    lo, hi = tl.where(flip, -hi, lo), tl.where(flip, -lo, hi)
    log_lo = _log_normal_tail(lo)
    tail = tl.where(hi == float("inf"), log_lo, log_lo + tl.log(-_expm1(_log_normal_tail(hi) - log_lo)))
    below = tl.where(lo == -float("inf"), 1.0, _erf_nonneg(-lo * INV_SQRT2))
    above = tl.where(hi == float("inf"), 1.0, _erf_nonneg(hi * INV_SQRT2))
    return tl.where(lo >= 0.0, tail, tl.log(0.5 * (below + above)))


@triton.jit
def vb_terms_kernel(X0, Noise, Out, Row, Result, per_sample, C, H, W, sxb, sxc, sxh, sxw, snb, snc, snh, snw,
                    sob, soc, soh, sow, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    # (B, P, Q, clip, c1, inv_sigma, kl_const, decoder): contract.TERM_COLUMNS, float64
    B, P, Q, clip = tl.load(Row), tl.load(Row + 1), tl.load(Row + 2), tl.load(Row + 3)
    c1, inv_sigma, kl_const, decoder = tl.load(Row + 4), tl.load(Row + 5), tl.load(Row + 6), tl.load(Row + 7)
    sse = tl.zeros([BLOCK], dtype=tl.float64)
    sqe = tl.zeros([BLOCK], dtype=tl.float64)
    nll = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, per_sample, BLOCK):
        e = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = e < per_sample
        c = e // (H * W)
        h = (e // W) % H
        w = e % W
        x0 = tl.load(X0 + b * sxb + c * sxc + h * sxh + w * sxw, mask=mask, other=0.0)
        noise = tl.load(Noise + b * snb + c * snc + h * snh + w * snw, mask=mask, other=0.0)
        out = tl.load(Out + b * sob + c * soc + h * soh + w * sow, mask=mask, other=0.0).to(tl.float32)
        # in float64: out − target is small beside either for a good network (csrc/vb_terms.h)
        x0, noise, out = x0.to(tl.float64), noise.to(tl.float64), out.to(tl.float64)
        d = out - (P * x0 + Q * noise)
        x0_hat = x0 + B * d  # = A·x_t + B·out
        err = -B * d  # x_0 − x̂0 without cancellation where nothing is clipped
        clipped = tl.where(x0_hat < -1.0, x0 + 1.0, tl.where(x0_hat > 1.0, x0 - 1.0, err))
        err = tl.where(clip != 0.0, clipped, err)
        sse += tl.where(mask, err * err, 0.0)
        sqe += tl.where(mask, d * d, 0.0)
        if decoder != 0.0:  # eq. 13: x_0's bin (edge bins to ±∞) under N(μ, σ_1²), x_0 − μ = c1·err
            u = c1 * err
            lo = tl.where(x0 < -_EDGE_BIN, -float("inf"), ((u - _BIN_HALF_WIDTH) * inv_sigma).to(tl.float32))
            hi = tl.where(x0 > _EDGE_BIN, float("inf"), ((u + _BIN_HALF_WIDTH) * inv_sigma).to(tl.float32))
            nll += tl.where(mask, -_log_normal_mass(lo, hi), 0.0).to(tl.float64)
    sse_total = tl.sum(sse, axis=0)
    scale = c1 * inv_sigma
    kl = per_sample * kl_const + 0.5 * scale * scale * sse_total
    term = tl.where(decoder != 0.0, tl.sum(nll, axis=0), kl)
    tl.store(Result + 3 * b, term)
    tl.store(Result + 3 * b + 1, sse_total)
    tl.store(Result + 3 * b + 2, tl.sum(sqe, axis=0))


BLOCKS = (128, 256, 512, 1024)  # elements a tile; one sample a program
# An explicit register limit: without one, ptxas trimmed the float32 512-element tile to an occupancy
# step on sm_89 by spilling 8 B to the stack (DESIGN §8); under maxnreg it spills only what the limit forces.
MAX_REGISTERS = 255
_INTS = ("per_sample", "C", "H", "W", "sxb", "sxc", "sxh", "sxw", "snb", "snc", "snh", "snw", "sob", "soc", "soh",
         "sow")


@functools.lru_cache
def launch_configs(capability: tuple[int, int]) -> list[dict]:
    """Every config the launcher can choose (the same on every GPU: no shared memory, no dots)."""
    return [dict(kernel=vb_terms_kernel, name=f"vb_terms_{name}_block{block}", num_warps=4, num_stages=1,
                 maxnreg=MAX_REGISTERS,
                 signature={"X0": "*fp32", "Noise": "*fp32", "Out": "*" + name, "Row": "*fp64", "Result": "*fp64",
                            **dict.fromkeys(_INTS, "i64"), "BLOCK": "constexpr"},
                 constexprs=dict(BLOCK=block))
            for name in _TYPES.values() for block in BLOCKS]


def select(per_sample: int, out_dtype: torch.dtype, capability: tuple[int, int]) -> dict:
    """The config of launch_configs(capability) for samples of `per_sample` elements (pure): the
    smallest tile that holds a sample, else the largest."""
    block = next((b for b in BLOCKS if b >= per_sample), BLOCKS[-1])
    name = f"vb_terms_{_TYPES[out_dtype]}_block{block}"
    return next(config for config in launch_configs(capability) if config["name"] == name)


def vb_terms(x_start: torch.Tensor, noise: torch.Tensor, model_output: torch.Tensor, row: torch.Tensor,
             result: torch.Tensor) -> None:
    """Fill result (float64 [B, 3]) with each sample's (term, Σ(x_0 − x̂0)², Σ(out − target)²)."""
    batch = x_start.shape[0]
    if batch == 0:
        return
    per_sample = x_start[0].numel()
    config = select(per_sample, model_output.dtype, _capability(x_start))
    C, H, W, *x_strides = _dims(x_start)
    vb_terms_kernel[(batch,)](x_start, noise, model_output, row, result, per_sample, C, H, W, *x_strides,
                              *_dims(noise)[3:], *_dims(model_output)[3:], **config["constexprs"],
                              num_warps=config["num_warps"], num_stages=config["num_stages"], maxnreg=config["maxnreg"])
