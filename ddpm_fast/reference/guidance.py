"""Guidance written from the papers (DESIGN §2.5), in the dtype of its inputs: what the guided
rows of the step table must reproduce (tests/test_guidance.py).

- classifier-free guidance (Ho & Salimans 2022, eq. 6): ε̃ = (1 + w)·ε(x, y) − w·ε(x, ∅);
- classifier guidance, ancestral (Dhariwal & Nichol 2021, Algorithm 1): x_{t−1} ~ N(μ + s·Σ·g, Σ);
- classifier guidance, DDIM (their eq. 14 and Algorithm 2): ε̂ = ε − s·√(1−ᾱ_t)·g, with ε taken
  from the clipped x̂0 when clipping, as their code does,
with g = ∇ₓ log p_φ(y | x_t, t).
"""
from __future__ import annotations

import torch

from ..schedule import NoiseSchedule
from .diffusion import _add_noise, extract, p_mean_variance, predict_noise_from_start, predict_start_and_noise


def classifier_free(conditional: torch.Tensor, unconditional: torch.Tensor, w: float) -> torch.Tensor:
    """(1 + w)·ε(x, y) − w·ε(x, ∅), eq. 6 of Ho & Salimans (for any parametrisation of the output)."""
    return (1 + w) * conditional - w * unconditional


def p_sample(schedule: NoiseSchedule, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
             noise: torch.Tensor | None, grad: torch.Tensor, s: float, clip_denoised: bool = True,
             variance: str = "fixed_large", prediction_type: str = "epsilon") -> torch.Tensor:
    """One ancestral step with the mean moved by s·Σ_t·g (Algorithm 1 of Dhariwal & Nichol); the
    noise is left out on the last step, as in reference.diffusion.p_sample."""
    out = p_mean_variance(schedule, model_output, x_t, t, clip_denoised, variance, prediction_type)
    return _add_noise(out["mean"] + s * out["variance"] * grad, out["variance"].sqrt(), t, noise)


def condition_output(schedule: NoiseSchedule, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                     grad: torch.Tensor, s: float, prediction_type: str = "epsilon",
                     clip_denoised: bool = False) -> torch.Tensor:
    """The network output whose ε is ε̂ = ε − s·√(1−ᾱ_t)·g (eq. 14), in its own parametrisation
    (x̂0 and v re-derived from x_t and ε̂ by eq. 4), for DDIM and every solver that reads ε. With
    clip_denoised, ε is first re-derived from the clipped x̂0, as guided-diffusion's
    condition_score takes it from its p_mean_variance; the x̂0 of ε̂ is then not clipped again
    (a DDIM step on this output runs without the clip)."""
    x0, eps = predict_start_and_noise(schedule, model_output, x_t, t, prediction_type)
    if clip_denoised:
        eps = predict_noise_from_start(schedule, x_t, t, x0.clamp(-1.0, 1.0))
    sqrt_ab = extract(schedule.sqrt_alphas_cumprod, t, x_t)
    sqrt_1m_ab = extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t)
    eps_hat = eps - s * sqrt_1m_ab * grad
    if prediction_type == "epsilon":
        return eps_hat
    x0_hat = (x_t - sqrt_1m_ab * eps_hat) / sqrt_ab
    return x0_hat if prediction_type == "x0" else sqrt_ab * eps_hat - sqrt_1m_ab * x0_hat
