"""The noise stream (DESIGN §3) written plainly in PyTorch.

Every Gaussian the sampler draws is a function of (seed, sample index s, noise key k,
element index e), e being the logical NCHW index inside one sample:

    (w0, w1, w2, w3) = Philox4x32-10(key=(seed mod 2^32, seed >> 32), counter=(e >> 2, s, k, version))
    u_j = uint_to_uniform_float(w_j)
    (n0, n1) = BoxMuller(u0, u1),  (n2, n3) = BoxMuller(u2, u3),  z = n_(e mod 4)

This is the recipe of Triton's tl.philox + pair_uniform_to_normal; the compiled and Triton
kernels must reproduce its Philox words bit for bit. Unsigned 32-bit words are held in
int64 tensors, so the arithmetic runs on any device torch supports.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..contract import (BOX_MULLER_MIN_U, NOISE_STREAM_VERSION, PHILOX_M0, PHILOX_M1, PHILOX_ROUNDS, PHILOX_W0,
                        PHILOX_W1, UINT32_RANGE, UNIFORM_SCALE, check_noise_args)

_MASK32 = 0xFFFFFFFF


def _mulhilo(m: int, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # The 64-bit product m·c split into 32-bit halves, built from 16-bit limbs so that no
    # intermediate overflows int64.
    p1 = m * (c >> 16)
    p0 = m * (c & 0xFFFF)
    hi = (p1 + (p0 >> 16)) >> 16
    lo = (((p1 & 0xFFFF) << 16) + p0) & _MASK32
    return hi, lo


def philox4x32_10(counter: torch.Tensor, seed: int) -> torch.Tensor:
    """Philox4x32-10 words for `counter` (int64 [..., 4], values in [0, 2^32)) under
    key (seed mod 2^32, seed >> 32). Returns int64 [..., 4] in [0, 2^32)."""
    c0, c1, c2, c3 = counter.to(torch.int64).unbind(-1)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W0) & _MASK32, (k1 + PHILOX_W1) & _MASK32
    return torch.stack([c0, c1, c2, c3], dim=-1)


def uint_to_uniform_float(words: torch.Tensor) -> torch.Tensor:
    """Triton's mapping of uint32 words (held in int64) to float32 uniforms in [0, 1)."""
    x = torch.where(words >= 1 << 31, words - UINT32_RANGE, words)  # bitcast to int32
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32, device=x.device)


def pair_uniform_to_normal(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Box–Muller in float32; `a` is clamped to BOX_MULLER_MIN_U so log(a) stays finite."""
    a = torch.clamp_min(a, BOX_MULLER_MIN_U)
    theta = b * torch.tensor(2 * math.pi, dtype=torch.float32, device=b.device)
    r = torch.sqrt(-2.0 * torch.log(a))
    return r * torch.cos(theta), r * torch.sin(theta)


def randn(shape: Sequence[int], seed: int, step: int, sample_offset: int = 0,
          device: torch.device | str | None = None) -> torch.Tensor:
    """float32 noise of `shape` ([B, ...]) for samples sample_offset .. sample_offset + B - 1
    under noise key `step`, exactly as DESIGN §3 defines it."""
    check_noise_args(shape, seed, step, sample_offset)
    return draw(tuple(shape), seed, step, sample_offset, device)


def draw(shape: tuple[int, ...], seed: int, step: int, sample_offset: int,
         device: torch.device | str | None = None) -> torch.Tensor:
    """randn without the argument checks, for callers that made them (ops.randn, the sampler)."""
    batch, per_sample = shape[0], math.prod(shape[1:])
    z = normal_quads(seed, step, torch.arange(sample_offset, sample_offset + batch, device=device),
                     torch.arange(-(-per_sample // 4), device=device))
    return z[:, :per_sample].reshape(shape).contiguous()


def normal_quads(seed: int, step: int, samples: torch.Tensor, quads: torch.Tensor) -> torch.Tensor:
    """float32 [len(samples), 4·len(quads)]: for each sample index, the normals of the logical
    elements 4q .. 4q + 3 of each quad q under noise key `step` — any part of a sample's noise
    without drawing the rest of it."""
    s, q = samples.to(torch.int64), quads.to(torch.int64)
    counter = torch.stack(torch.broadcast_tensors(q[None, :], s[:, None],
                                                  torch.full((), step, dtype=torch.int64, device=q.device),
                                                  torch.full((), NOISE_STREAM_VERSION, dtype=torch.int64,
                                                             device=q.device)), dim=-1)
    u = uint_to_uniform_float(philox4x32_10(counter, seed))
    n0, n1 = pair_uniform_to_normal(u[..., 0], u[..., 1])
    n2, n3 = pair_uniform_to_normal(u[..., 2], u[..., 3])
    return torch.stack([n0, n1, n2, n3], dim=-1).reshape(len(s), 4 * len(q))
