"""Triton kernel of the fused sampling update (DESIGN §2) with in-kernel noise (DESIGN §3).

Each program updates BLOCK quads (four consecutive logical elements) of one sample: one
tl.philox call per quad gives its four normals — the exact recipe of the reference and of
csrc/common/philox.h. The coefficient row and noise key are read at a step index in device memory;
an index outside the table writes NaN (a device-side error the sampler's finite check sees), and so
does a learned-variance row (DESIGN §2.3) launched without the network's variance channels.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..contract import NUM_STEP_COLUMNS
from . import TYPES as _TYPES, capability as _capability


@triton.jit
def _learned_std(v, learned, log_beta, log_beta_tilde):
    # √Σ_θ = exp(½·log Σ_θ), log Σ_θ = frac·log β_t + (1 − frac)·log β̃_t with frac = (v + 1)/2
    # ("learned_range", Nichol & Dhariwal 2021 eq. 15) or v itself ("learned", learned = 2); 1 on a
    # fixed row (learned = 0), which ignores v
    frac = (v + 1.0) / 2.0
    log_variance = tl.where(learned == 2.0, v, frac * log_beta + (1.0 - frac) * log_beta_tilde)
    return tl.where(learned != 0.0, tl.exp(0.5 * log_variance), 1.0)


@triton.jit
def _update(X, Out, History, Uncond, Grad, Var, b, e, z, per_sample, C, H, W, sxb, sxc, sxh, sxw, sob, soc, soh, sow,
            A, B, Cx0, D, E, sigma, clip, Hx0, cfg, Gout, Gmean, learned, log_beta, log_beta_tilde, valid,
            HAS_HISTORY: tl.constexpr, HAS_UNCOND: tl.constexpr, HAS_GRAD: tl.constexpr, HAS_VAR: tl.constexpr):
    mask = e < per_sample
    c = e // (H * W)
    h = (e // W) % H
    w = e % W
    offset = b * sxb + c * sxc + h * sxh + w * sxw
    out_offset = b * sob + c * soc + h * soh + w * sow
    x = tl.load(X + offset, mask=mask, other=0.0)
    out = tl.load(Out + out_offset, mask=mask, other=0.0).to(tl.float32)
    if HAS_UNCOND:  # classifier-free guidance, (1 + w)·out − w·uncond written as in cfg_output (DESIGN §2.5)
        out = out + cfg * (out - tl.load(Uncond + out_offset, mask=mask, other=0.0).to(tl.float32))
    if HAS_GRAD:  # a classifier's ∇ₓ log p(y | x_t): on the output (ε̂) and on the mean (μ + sΣg)
        g = tl.load(Grad + offset, mask=mask, other=0.0)
        out = out + Gout * g
    x0_hat = A * x + B * out
    # comparisons rather than min/max, so a NaN stays NaN for the sampler's finite check
    clipped = tl.where(x0_hat < -1.0, -1.0, tl.where(x0_hat > 1.0, 1.0, x0_hat))
    x0_hat = tl.where(clip != 0.0, clipped, x0_hat)
    if HAS_VAR:  # a learned row's noise σ·√Σ·z and mean shift Gmean·Σ·g, Σ per element (DESIGN §2.3)
        std = _learned_std(tl.load(Var + out_offset, mask=mask, other=0.0).to(tl.float32), learned, log_beta,
                           log_beta_tilde)
        x_prev = Cx0 * x0_hat + D * x + E * out + sigma * std * z
        if HAS_GRAD:
            x_prev += Gmean * (std * std) * g
    else:
        x_prev = Cx0 * x0_hat + D * x + E * out + sigma * z
        if HAS_GRAD:
            x_prev += Gmean * g
    if HAS_HISTORY:  # the previous row's x̂0 (history has x's strides), then this row's in its place
        x_prev += Hx0 * tl.load(History + offset, mask=mask, other=0.0)
        tl.store(History + offset, x0_hat, mask=mask & valid)
    tl.store(X + offset, tl.where(valid, x_prev, float("nan")), mask=mask)


@triton.jit
def diffusion_step_kernel(X, Out, History, Uncond, Grad, Var, Coefs, Keys, StepIndex, rows, seed, sample_offset,
                          per_sample, blocks, C, H, W, sxb, sxc, sxh, sxw, sob, soc, soh, sow, BLOCK: tl.constexpr,
                          COLUMNS: tl.constexpr, HAS_HISTORY: tl.constexpr, HAS_UNCOND: tl.constexpr,
                          HAS_GRAD: tl.constexpr, HAS_VAR: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // blocks).to(tl.int64)
    q = (pid % blocks).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    index = tl.load(StepIndex)
    valid = (index >= 0) & (index < rows)
    # (A, B, C, D, E, sigma, clip, H, w, Gout, Gmean, learned, log_beta, log_beta_tilde)
    row = Coefs + tl.where(valid, index, 0) * COLUMNS
    A, B, Cx0 = tl.load(row), tl.load(row + 1), tl.load(row + 2)
    D, E, sigma, clip = tl.load(row + 3), tl.load(row + 4), tl.load(row + 5), tl.load(row + 6)
    Hx0, cfg, Gout, Gmean = tl.load(row + 7), tl.load(row + 8), tl.load(row + 9), tl.load(row + 10)
    learned, log_beta, log_beta_tilde = tl.load(row + 11), tl.load(row + 12), tl.load(row + 13)
    if not HAS_VAR:  # a learned row without the variance channels
        valid = valid & (learned == 0.0)
    key = tl.load(Keys + tl.where(valid, index, 0)).to(tl.uint32)
    zero = tl.zeros([BLOCK], dtype=tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, q.to(tl.uint32), zero + (sample_offset + b).to(tl.uint32), zero + key, zero)
    n0, n1 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(w0), tl.uint_to_uniform_float(w1))
    n2, n3 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(w2), tl.uint_to_uniform_float(w3))
    e = q * 4
    _update(X, Out, History, Uncond, Grad, Var, b, e, n0, per_sample, C, H, W, sxb, sxc, sxh, sxw, sob, soc, soh,
            sow, A, B, Cx0, D, E, sigma, clip, Hx0, cfg, Gout, Gmean, learned, log_beta, log_beta_tilde, valid,
            HAS_HISTORY, HAS_UNCOND, HAS_GRAD, HAS_VAR)
    _update(X, Out, History, Uncond, Grad, Var, b, e + 1, n1, per_sample, C, H, W, sxb, sxc, sxh, sxw, sob, soc, soh,
            sow, A, B, Cx0, D, E, sigma, clip, Hx0, cfg, Gout, Gmean, learned, log_beta, log_beta_tilde, valid,
            HAS_HISTORY, HAS_UNCOND, HAS_GRAD, HAS_VAR)
    _update(X, Out, History, Uncond, Grad, Var, b, e + 2, n2, per_sample, C, H, W, sxb, sxc, sxh, sxw, sob, soc, soh,
            sow, A, B, Cx0, D, E, sigma, clip, Hx0, cfg, Gout, Gmean, learned, log_beta, log_beta_tilde, valid,
            HAS_HISTORY, HAS_UNCOND, HAS_GRAD, HAS_VAR)
    _update(X, Out, History, Uncond, Grad, Var, b, e + 3, n3, per_sample, C, H, W, sxb, sxc, sxh, sxw, sob, soc, soh,
            sow, A, B, Cx0, D, E, sigma, clip, Hx0, cfg, Gout, Gmean, learned, log_beta, log_beta_tilde, valid,
            HAS_HISTORY, HAS_UNCOND, HAS_GRAD, HAS_VAR)


def _dims(t: torch.Tensor) -> tuple[int, ...]:
    # (C, H, W, stride_b, stride_c, stride_h, stride_w) of t seen as [B, C, H, W]
    if t.dim() == 4:
        return (*t.shape[1:], *t.stride())
    per = t[0].numel() if t.shape[0] else 0
    return (per, 1, 1, per, 1, 1, 1)


BLOCKS = tuple(1 << i for i in range(9))  # quads per program: 1 … 256
# With the history buffer, 256 quads a program spill 8 B a thread on sm_120 (40 B of stack where
# the others hold the 32 B of the untaken Payne–Hanek path: benchmarks/results/kernel-resources.md)
HISTORY_BLOCKS = BLOCKS[:-1]
# Guided and learned-variance variants (uncond and/or classifier gradient, DESIGN §2.5; the variance
# channels, §2.3) ship one size, 128 quads (idle lanes for samples under 512 elements): every size
# is compiled for every target in CI and in the kernel report, and a guided step's time is the
# network's, run on twice the batch (a learned variance's, on twice the output channels).
GUIDED_BLOCKS = (128,)
# An explicit register limit for these variants: under Triton 3.6 ptxas trimmed the one with both
# guidance inputs to an occupancy step on sm_120 by spilling 8 B a thread (40 B of stack: the 32 B
# frame of the untaken Payne–Hanek path, plus the spill) at the same 48 registers; under a limit it
# spills only what the limit forces, and 255 forces none (DESIGN §8).
GUIDED_MAX_REGISTERS = 255
# (history, uncond, grad, var): every combination of the optional inputs the op takes (the history
# of multistep rows and the variance channels of learned DDPM rows never meet, DESIGN §5.1)
VARIANTS = tuple((history, uncond, grad, var) for history in (False, True) for uncond in (False, True)
                 for grad in (False, True) for var in (False, True) if not (history and var))
_INTS = ("rows", "seed", "sample_offset", "per_sample", "blocks", "C", "H", "W", "sxb", "sxc", "sxh", "sxw",
         "sob", "soc", "soh", "sow")


def _blocks(history: bool, uncond: bool, grad: bool, var: bool) -> tuple[int, ...]:
    return GUIDED_BLOCKS if uncond or grad or var else HISTORY_BLOCKS if history else BLOCKS


def _name(out_type: str, block: int, history: bool, uncond: bool, grad: bool, var: bool) -> str:
    return (f"diffusion_step_{out_type}_block{block}{'_history' * history}{'_cfg' * uncond}{'_grad' * grad}"
            f"{'_learned' * var}")


@functools.lru_cache
def launch_configs(capability: tuple[int, int]) -> list[dict]:
    """Every config the launcher can choose (the same on every GPU: no shared memory, no dots)."""
    return [dict(kernel=diffusion_step_kernel, name=_name(name, block, *variant), num_warps=4, num_stages=1,
                 **(dict(maxnreg=GUIDED_MAX_REGISTERS) if any(variant[1:]) else {}),
                 signature={"X": "*fp32", "Out": "*" + name, "History": "*fp32", "Uncond": "*" + name,
                            "Grad": "*fp32", "Var": "*" + name, "Coefs": "*fp32", "Keys": "*i64", "StepIndex": "*i64",
                            **dict.fromkeys(_INTS, "i64"), "BLOCK": "constexpr", "COLUMNS": "constexpr",
                            "HAS_HISTORY": "constexpr", "HAS_UNCOND": "constexpr", "HAS_GRAD": "constexpr",
                            "HAS_VAR": "constexpr"},
                 constexprs=dict(BLOCK=block, COLUMNS=NUM_STEP_COLUMNS, HAS_HISTORY=variant[0],
                                 HAS_UNCOND=variant[1], HAS_GRAD=variant[2], HAS_VAR=variant[3]))
            for name in _TYPES.values() for variant in VARIANTS for block in _blocks(*variant)]


def select(quads: int, out_dtype: torch.dtype, history: bool, capability: tuple[int, int], uncond: bool = False,
           grad: bool = False, var: bool = False) -> dict:
    """The config of launch_configs(capability) for `quads` quads per sample (pure): the smallest
    block that holds a sample, else the largest."""
    blocks = _blocks(history, uncond, grad, var)
    block = next((b for b in blocks if b >= quads), blocks[-1])
    name = _name(_TYPES[out_dtype], block, history, uncond, grad, var)
    return next(config for config in launch_configs(capability) if config["name"] == name)


def diffusion_step(x: torch.Tensor, model_output: torch.Tensor, coefs: torch.Tensor, noise_keys: torch.Tensor,
                   step_index: torch.Tensor, seed: int, sample_offset: int, history: torch.Tensor | None,
                   uncond_output: torch.Tensor | None = None, guidance_grad: torch.Tensor | None = None,
                   variance_output: torch.Tensor | None = None) -> None:
    """Launch the update of x (and of history, when given) in place: one program per BLOCK quads
    of one sample. Absent optional inputs are passed as x or model_output and never read (their
    constexpr is off)."""
    batch = x.shape[0]
    per_sample = x[0].numel() if batch else 0
    quads = (per_sample + 3) // 4
    if batch == 0 or quads == 0:
        return
    config = select(quads, model_output.dtype, history is not None, _capability(x), uncond_output is not None,
                    guidance_grad is not None, variance_output is not None)
    blocks = triton.cdiv(quads, config["constexprs"]["BLOCK"])
    C, H, W, *x_strides = _dims(x)
    out_strides = _dims(model_output)[3:]
    diffusion_step_kernel[(batch * blocks,)](
        x, model_output, x if history is None else history,
        model_output if uncond_output is None else uncond_output, x if guidance_grad is None else guidance_grad,
        model_output if variance_output is None else variance_output,
        coefs, noise_keys, step_index, coefs.shape[0], seed,
        sample_offset, per_sample, blocks, C, H, W, *x_strides, *out_strides, **config["constexprs"],
        **{option: config[option] for option in ("num_warps", "num_stages", "maxnreg") if option in config})
