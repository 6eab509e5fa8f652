"""The table-driven sampling update of DESIGN §2, plainly: what every fused diffusion_step
kernel computes, given the same network output and noise."""
from __future__ import annotations

import torch


def diffusion_step(x: torch.Tensor, model_output: torch.Tensor, row: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """x_prev for one coefficient row (A, B, C, D, E, σ, clip), computed in x's dtype:
    x̂0 = A·x + B·out (clipped if clip), x_prev = C·x̂0 + D·x + E·out + σ·z."""
    A, B, C, D, E, sigma, clip = row.to(device=x.device, dtype=x.dtype).unbind()
    out = model_output.to(x.dtype)
    x0_hat = A * x + B * out
    if clip != 0:
        x0_hat = x0_hat.clamp(-1.0, 1.0)
    return C * x0_hat + D * x + E * out + sigma * z.to(x.dtype)
