"""Attention, materialised: the maths every attention kernel reproduces, with the public op's
signature (DESIGN §5)."""
from __future__ import annotations

import torch


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale) v over [B, heads, N, d], scale = d^(−1/2) by default, the N×N
    weights materialised in the inputs' dtype (the original's einsum + softmax)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    w = torch.softmax(torch.einsum("bhnd,bhmd->bhnm", q, k) * scale, dim=-1)
    return torch.einsum("bhnm,bhmd->bhnd", w, v)
