"""The U-Net's fusable pieces, unfused: the maths the fast kernels must reproduce, with the
signatures of the public ops (DESIGN §9)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def group_norm_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int,
                    eps: float = 1e-6, add: torch.Tensor | None = None, act: bool = True) -> torch.Tensor:
    """act(GroupNorm(x + add[:, :, None, None]) · weight + bias), act = swish or identity."""
    if add is not None:
        x = x + add[:, :, None, None]
    h = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(h) if act else h


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale) v over [B, heads, N, d], scale = d^(−1/2) by default, the N×N
    weights materialised in the inputs' dtype (the original's einsum + softmax)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    w = torch.softmax(torch.einsum("bhnd,bhmd->bhnm", q, k) * scale, dim=-1)
    return torch.einsum("bhnm,bhmd->bhnd", w, v)
