"""GroupNorm (+ the ResBlock's time-embedding add, + the scale-shift of guided-diffusion's
use_scale_shift_norm) + SiLU, unfused: the maths every group_norm_silu kernel reproduces, with the
public op's signature (DESIGN §5)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def group_norm_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int,
                    eps: float = 1e-6, add: torch.Tensor | None = None, act: bool = True, *,
                    scale: torch.Tensor | None = None, shift: torch.Tensor | None = None) -> torch.Tensor:
    """act((GroupNorm(x + add[:, :, None, None]) · weight + bias) · (1 + scale) + shift), act = swish
    or identity, scale and shift [N, C] (guided-diffusion's ResBlock with use_scale_shift_norm), with
    the statistics (biased variance, as GroupNorm's) in float32, or float64 for float64 x, and the
    result in x's dtype. Written out rather than F.group_norm, which refuses one value per
    channel (N = H = W = 1) although a group of C/G > 1 channels then still has a variance."""
    h = x.to(torch.promote_types(x.dtype, torch.float32))
    per_sample = lambda t: t.to(h.dtype)[:, :, None, None]  # noqa: E731  ([N, C] → [N, C, 1, 1])
    if add is not None:
        h = h + per_sample(add)
    groups = h.reshape(h.shape[0], num_groups, -1)
    centred = groups - groups.mean(-1, keepdim=True)
    normed = (centred * torch.rsqrt(centred.square().mean(-1, keepdim=True) + eps)).reshape(h.shape)
    h = normed * weight.to(h.dtype)[:, None, None] + bias.to(h.dtype)[:, None, None]
    if scale is not None:
        h = h * (1 + per_sample(scale))
    if shift is not None:
        h = h + per_sample(shift)
    return (F.silu(h) if act else h).to(x.dtype)
