"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2) and its SDE variant written
from the paper's equations, in float64: the anchor of the step-table rows of
ddpm_fast/dpm_solver.py (DESIGN §2.4), which fold the same update into C, D, H and σ."""
from __future__ import annotations

from typing import Callable

import torch

from ..contract import PREDICTION_TYPES, check_choice


def dpm_solver_pp(model: Callable, x_T: torch.Tensor, timesteps: list[int], sigmas: list[float], orders: list[int],
                  prediction_type: str = "epsilon", clip_denoised: bool = False, stochastic: bool = False,
                  noise: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor:
    """x_0 from x_T: model(x, t) at timesteps[i] with σ_i = sigmas[i] (σ = σ_t/α_t, len S + 1, the
    last the final σ), solver order orders[i] (1 or 2) at step i, noise(i) the z of step i (SDE)."""
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if not len(timesteps) == len(orders) == len(sigmas) - 1:
        raise ValueError("need S timesteps, S orders and S + 1 sigmas")
    sigma = torch.tensor(sigmas, dtype=torch.float64)
    alpha_t = 1 / torch.sqrt(sigma ** 2 + 1)  # the VP process: α_t² + σ_t² = 1, σ_t/α_t = sigma
    sigma_t = sigma * alpha_t
    lambda_t = torch.log(alpha_t) - torch.log(sigma_t)  # the half log-SNR, +∞ at a final σ of 0
    x = x_T.double()
    previous = None  # x_θ at the previous step, the multistep history
    for i, (t, order) in enumerate(zip(timesteps, orders)):
        out = model(x, torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device)).double()
        if prediction_type == "epsilon":
            data = (x - sigma_t[i] * out) / alpha_t[i]
        elif prediction_type == "v":
            data = alpha_t[i] * x - sigma_t[i] * out
        else:
            data = out
        if clip_denoised:
            data = data.clamp(-1.0, 1.0)
        h = lambda_t[i + 1] - lambda_t[i]
        if order == 1:
            D = data  # eq. (9): the first-order (DDIM) step of the data-prediction ODE
        else:  # Algorithm 2, line 6: r_i = h_{i−1}/h_i, D_i = (1 + 1/(2r_i))·x_θ(t_{i−1}) − 1/(2r_i)·x_θ(t_{i−2})
            r = (lambda_t[i] - lambda_t[i - 1]) / h
            D = (1 + 1 / (2 * r)) * data - 1 / (2 * r) * previous
        if stochastic:  # the SDE counterpart: e^{−h} on x, 1 − e^{−2h} on D, σ_t √(1 − e^{−2h}) z
            x = (sigma_t[i + 1] / sigma_t[i] * torch.exp(-h)) * x + alpha_t[i + 1] * (1 - torch.exp(-2 * h)) * D \
                + sigma_t[i + 1] * torch.sqrt(1 - torch.exp(-2 * h)) * noise(i).double()
        else:  # Algorithm 2, line 7
            x = (sigma_t[i + 1] / sigma_t[i]) * x - alpha_t[i + 1] * (torch.exp(-h) - 1) * D
        previous = data
    return x
