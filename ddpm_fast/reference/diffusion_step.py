"""The table-driven sampling update of DESIGN §2, plainly: what every fused diffusion_step
kernel computes, given the same network output and noise."""
from __future__ import annotations

import torch

from ..contract import STEP_COLUMNS
from ..schedule import guided_output, learned_variance, x0_hat

_C, _D, _E, _SIGMA, _H, _GMEAN, _LEARNED = (STEP_COLUMNS.index(name)
                                           for name in ("C", "D", "E", "sigma", "H", "Gmean", "learned"))


def diffusion_step(x: torch.Tensor, model_output: torch.Tensor, row: torch.Tensor, z: torch.Tensor,
                   history: torch.Tensor | None = None, uncond_output: torch.Tensor | None = None,
                   guidance_grad: torch.Tensor | None = None, variance_output: torch.Tensor | None = None) -> torch.Tensor:
    """x_prev for one coefficient row (A, B, C, D, E, σ, clip, H, w, Gout, Gmean, learned, log_beta,
    log_beta_tilde), computed in x's dtype: out ← (1 + w)·out − w·uncond (classifier-free guidance,
    with an uncond_output) + Gout·g (with a guidance_grad g), x̂0 = A·x + B·out (clipped if clip),
    x_prev = C·x̂0 + D·x + E·out + H·x̂0' + Gmean·Σ·g + σ·√Σ·z, with x̂0' the previous row's x̂0 held
    in `history`, which then receives this row's x̂0 (as the fused op does; each optional input's
    term is absent without it), and Σ the learned variance of a learned row from variance_output
    (schedule.learned_variance; 1 on other rows). A learned row without variance_output is refused."""
    row = row.to(device=x.device, dtype=x.dtype)
    out = guided_output(row, model_output.to(x.dtype), uncond_output, guidance_grad)
    x0 = x0_hat(row, x, out)
    if row[_LEARNED] != 0 and variance_output is None:
        raise ValueError("a learned-variance row needs variance_output, the network's variance channels")
    variance = 1.0 if variance_output is None else learned_variance(row, variance_output.to(x.dtype))
    x_prev = row[_C] * x0 + row[_D] * x + row[_E] * out + row[_SIGMA] * variance ** 0.5 * z.to(x.dtype)
    if guidance_grad is not None:
        x_prev = x_prev + row[_GMEAN] * variance * guidance_grad.to(x.dtype)
    if history is not None:
        x_prev = x_prev + row[_H] * history.to(x.dtype)
        history.copy_(x0)
    return x_prev
