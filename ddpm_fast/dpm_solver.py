"""DPM-Solver++(2M) and DPM-Solver++(2M) SDE (Lu et al. 2022, "DPM-Solver++", Algorithm 2 and
its SDE counterpart) as rows of the step table (DESIGN §2.4), in float64.

The solver sees the VP process x_t = α_t x_0 + σ_t ε through σ = σ_t/α_t (diffusers' `sigmas`)
and the log-SNR λ = log(α_t/σ_t) = −log σ. With h = λ_next − λ_now, x̂0 the data prediction now
and x̂0' the previous one (r = h_prev/h), eq. (5)/(8) of the paper with the midpoint D1 give

    ODE:  x_next = (σ_next/σ_now)·x + α_next(1 − e^{−h})·((1 + 1/(2r))·x̂0 − 1/(2r)·x̂0')
    SDE:  x_next = (σ_next/σ_now)e^{−h}·x + α_next(1 − e^{−2h})·((1 + 1/(2r))·x̂0 − 1/(2r)·x̂0')
                   + σ_next·√(1 − e^{−2h})·z

(first order: the x̂0' terms dropped). That is the table's row with C, D, H and σ; x̂0 = A·x + B·out
is as for DDIM with α, σ taken from the row's σ (which Karras and λ-uniform spacings place
between the training timesteps). Timesteps, sigmas and the order schedule are those of
diffusers' DPMSolverMultistepScheduler (solver_order 2, midpoint, lower_order_final).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .contract import DPM_SPACINGS, check_choice

FINAL_SIGMAS = ("zero", "sigma_min")
KARRAS_RHO = 7.0  # Karras et al. 2022, eq. (5)


def timesteps_and_sigmas(alphas_cumprod: torch.Tensor, steps: int, spacing: str = "linspace",
                         karras: bool = False, final_sigma: str = "zero") -> tuple[list[int], list[float]]:
    """The model's timesteps (S, descending) and σ = √((1 − ᾱ)/ᾱ) at each of them plus the final
    one (S + 1), exactly as diffusers' DPMSolverMultistepScheduler.set_timesteps defines them:
    "linspace" rounds linspace(0, T−1, S+1), reversed, last dropped (999 … 50 at S = 20);
    "leading" i·⌊T/(S+1)⌋; "trailing" round(T − i·T/S) − 1; "lambda" is uniform in log σ
    (= −λ, the paper's log-SNR spacing, diffusers' use_lu_lambdas); karras=True takes σ from
    Karras et al.'s ρ = 7 ramp (use_karras_sigmas). Both of the last place σ off the training
    grid and give the model the nearest timestep by diffusers' log-σ interpolation, rounded."""
    check_choice("spacing", spacing, DPM_SPACINGS)
    check_choice("final_sigma", final_sigma, FINAL_SIGMAS)
    T = alphas_cumprod.numel()
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an int in [1, {T}], got {steps!r}")
    if karras and spacing != "linspace":
        raise ValueError(f"Karras sigmas choose their own timesteps; spacing must stay 'linspace', got {spacing!r}")
    ab = alphas_cumprod.double().numpy()
    if not (ab > 0).all():
        raise ValueError("DPM-Solver needs ᾱ > 0 at every timestep (σ = √((1 − ᾱ)/ᾱ) is infinite at ᾱ = 0); "
                         "zero-terminal-SNR schedules are not supported")
    grid = np.sqrt((1 - ab) / ab)
    log_grid = np.log(grid)
    if karras:
        ramp = np.linspace(0, 1, steps)
        lo, hi = grid[0] ** (1 / KARRAS_RHO), grid[-1] ** (1 / KARRAS_RHO)
        sigmas = (hi + ramp * (lo - hi)) ** KARRAS_RHO
        timesteps = _sigma_to_t(sigmas, log_grid).round()
    elif spacing == "lambda":
        sigmas = np.exp(np.linspace(log_grid[-1], log_grid[0], steps))
        timesteps = _sigma_to_t(sigmas, log_grid).round()
    else:
        if spacing == "linspace":
            timesteps = np.linspace(0, T - 1, steps + 1).round()[::-1][:-1]
        elif spacing == "leading":
            timesteps = (np.arange(0, steps + 1) * (T // (steps + 1))).round()[::-1][:-1]
        else:
            timesteps = np.arange(T, 0, -T / steps).round() - 1
        sigmas = grid[timesteps.astype(np.int64)]
    final = 0.0 if final_sigma == "zero" else grid[0]
    return timesteps.astype(np.int64).tolist(), [*sigmas.tolist(), final]


def _sigma_to_t(sigmas: np.ndarray, log_grid: np.ndarray) -> np.ndarray:
    # diffusers' _sigma_to_t: linear interpolation of the timestep in log σ between grid points
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_grid[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_grid.shape[0] - 2)
    w = np.clip((log_grid[low] - log_sigma) / (log_grid[low] - log_grid[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def alpha_sigma(sigma: float) -> tuple[float, float]:
    """(α_t, σ_t) of the VP process whose σ_t/α_t is `sigma` (α_t² + σ_t² = 1)."""
    alpha = 1.0 / math.sqrt(sigma * sigma + 1.0)
    return alpha, sigma * alpha


def orders(steps: int, order: int, final_sigma: str = "zero", lower_order_final: bool = True) -> list[int]:
    """The solver order of each step, as diffusers' step() picks it: first order at the first step
    (no history yet), and at the last when the final σ is 0 (h = ∞) or lower_order_final with
    fewer than 15 steps."""
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order!r}")
    last_first = final_sigma == "zero" or (lower_order_final and steps < 15)
    return [1 if order == 1 or i == 0 or (i == steps - 1 and last_first) else 2 for i in range(steps)]


def rows(alphas_cumprod: torch.Tensor, steps: int, spacing: str, karras: bool, order: int, stochastic: bool,
         prediction_type: str, clip: bool, final_sigma: str = "zero",
         lower_order_final: bool = True) -> tuple[list[tuple[float, ...]], list[int], list[tuple[float, float]]]:
    """The (A, B, C, D, E, σ, clip, H) rows of a DPM-Solver++ run, its model timesteps and each
    row's (α_t, σ_t) (where its x̂0 is estimated: what classifier guidance scales by, DESIGN §2.5)."""
    timesteps, sigmas = timesteps_and_sigmas(alphas_cumprod, steps, spacing, karras, final_sigma)
    table, vp = [], []
    same = [math.isclose(a, b, rel_tol=1e-12) for a, b in zip(sigmas, sigmas[1:])]
    if any(b > a and not equal for a, b, equal in zip(sigmas, sigmas[1:], same)):
        raise ValueError(f"σ must not grow from one step to the next, got σ = {sigmas}")
    for i, step_order in enumerate(orders(len(timesteps), order, final_sigma, lower_order_final)):
        alpha_s, sigma_s = alpha_sigma(sigmas[i])
        # x̂0 = A·x + B·out per prediction type (diffusers' convert_model_output)
        A, B = {"epsilon": (1 / alpha_s, -sigma_s / alpha_s), "x0": (0.0, 1.0), "v": (alpha_s, -sigma_s)}[prediction_type]
        vp.append((alpha_s, sigma_s))
        if same[i]:
            # h = 0: a repeated timestep (S close to T rounds two onto one) or a final σ "sigma_min"
            # equal to the last (Karras σ end there): diffusers' update leaves x as it is
            table.append((A, B, 0.0, 1.0, 0.0, 0.0, float(clip), 0.0))
            continue
        if i and same[i - 1]:
            step_order = 1  # h_prev = 0 makes r = 0: the second-order term is undefined (∞ in diffusers)
        alpha_t, sigma_t = alpha_sigma(sigmas[i + 1])
        exp_h = sigmas[i + 1] / sigmas[i]  # e^{−h} = e^{λ_s − λ_t} = σ_next/σ_now, 0 at a final σ of 0
        if stochastic:
            D, Q, noise = sigma_t / sigma_s * exp_h, alpha_t * (1 - exp_h ** 2), sigma_t * math.sqrt(1 - exp_h ** 2)
        else:
            D, Q, noise = sigma_t / sigma_s, alpha_t * (1 - exp_h), 0.0
        if step_order == 1:
            C, H = Q, 0.0
        else:  # r = h_prev/h, with h_prev = λ_now − λ_prev = log(σ_prev/σ_now)
            r = math.log(sigmas[i - 1] / sigmas[i]) / math.log(sigmas[i] / sigmas[i + 1])
            C, H = Q * (1 + 0.5 / r), -Q * 0.5 / r
        table.append((A, B, C, D, 0.0, noise, float(clip), H))
    return table, timesteps, vp
