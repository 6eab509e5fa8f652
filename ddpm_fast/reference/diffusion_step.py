"""The table-driven sampling update of DESIGN §2, plainly: what every fused diffusion_step
kernel computes, given the same network output and noise."""
from __future__ import annotations

import torch

from ..contract import STEP_COLUMNS
from ..schedule import x0_hat

_C, _D, _E, _SIGMA = (STEP_COLUMNS.index(name) for name in ("C", "D", "E", "sigma"))


def diffusion_step(x: torch.Tensor, model_output: torch.Tensor, row: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """x_prev for one coefficient row (A, B, C, D, E, σ, clip), computed in x's dtype:
    x̂0 = A·x + B·out (clipped if clip), x_prev = C·x̂0 + D·x + E·out + σ·z."""
    row = row.to(device=x.device, dtype=x.dtype)
    out = model_output.to(x.dtype)
    return row[_C] * x0_hat(row, x, out) + row[_D] * x + row[_E] * out + row[_SIGMA] * z.to(x.dtype)
