"""The diffusion maths of Ho et al. 2020 (and DDIM, Song et al. 2021) written plainly.

Functions follow improved-diffusion's names: q_* are the forward process, p_* the learned
reverse process. Every function takes a batch of 0-based timesteps t (int64 [B]); tables are
gathered with `extract` and cast to the dtype of x, so float64 inputs give a float64
reference and float32 inputs compute what float32 implementations (diffusers) compute.
"""
from __future__ import annotations

import torch

from ..contract import PREDICTION_TYPES, VARIANCES, check_choice
from ..schedule import NoiseSchedule


def extract(table: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """table[t] in x's dtype and device, shaped [B, 1, ..., 1] to broadcast over x."""
    return table.to(device=x.device, dtype=x.dtype)[t.to(x.device)].reshape(-1, *([1] * (x.dim() - 1)))


def _check(schedule: NoiseSchedule, x: torch.Tensor, t: torch.Tensor, **same_shape: torch.Tensor | None) -> None:
    schedule.check_timesteps(t)
    if x.dim() < 1 or t.shape != (x.shape[0],):
        raise ValueError(f"t must have shape [B] = [{x.shape[0] if x.dim() else '?'}], got {tuple(t.shape)}")
    for name, other in same_shape.items():
        if other is not None and other.shape != x.shape:
            raise ValueError(f"{name} must have the shape of x_t {tuple(x.shape)}, got {tuple(other.shape)}")


def q_sample(schedule: NoiseSchedule, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε — eq. 4."""
    _check(schedule, x_start, t, noise=noise)
    return (extract(schedule.sqrt_alphas_cumprod, t, x_start) * x_start
            + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)


def q_posterior_mean_variance(schedule: NoiseSchedule, x_start: torch.Tensor, x_t: torch.Tensor,
                              t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean μ̃_t(x_t, x_0) and variance β̃_t of q(x_{t−1} | x_t, x_0) — eqs. 6-7."""
    _check(schedule, x_t, t, x_start=x_start)
    mean = (extract(schedule.posterior_mean_coef1, t, x_t) * x_start
            + extract(schedule.posterior_mean_coef2, t, x_t) * x_t)
    return mean, extract(schedule.posterior_variance, t, x_t)


def predict_start_from_noise(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor,
                             eps: torch.Tensor) -> torch.Tensor:
    """x̂_0 = (x_t − √(1−ᾱ_t) ε)/√ᾱ_t, eq. 4 solved for x_0."""
    _check(schedule, x_t, t, eps=eps)
    return (extract(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)


def predict_noise_from_start(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor,
                             x_start: torch.Tensor) -> torch.Tensor:
    """ε = (x_t − √ᾱ_t x̂_0)/√(1−ᾱ_t), eq. 4 solved for ε."""
    _check(schedule, x_t, t, x_start=x_start)
    return ((x_t - extract(schedule.sqrt_alphas_cumprod, t, x_t) * x_start)
            / extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t))


def predict_start_and_noise(schedule: NoiseSchedule, model_output: torch.Tensor, x_t: torch.Tensor,
                            t: torch.Tensor, prediction_type: str = "epsilon") -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂_0, ε̂) from the network output, whichever of ε, x_0 or v (= √ᾱ ε − √(1−ᾱ) x_0) it predicts."""
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    _check(schedule, x_t, t, model_output=model_output)
    if prediction_type == "epsilon":
        return predict_start_from_noise(schedule, x_t, t, model_output), model_output
    if prediction_type == "x0":
        return model_output, predict_noise_from_start(schedule, x_t, t, model_output)
    sqrt_ab = extract(schedule.sqrt_alphas_cumprod, t, x_t)
    sqrt_1m_ab = extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t)
    return sqrt_ab * x_t - sqrt_1m_ab * model_output, sqrt_1m_ab * x_t + sqrt_ab * model_output


def p_mean_variance(schedule: NoiseSchedule, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                    clip_denoised: bool = True, variance: str = "fixed_large",
                    prediction_type: str = "epsilon") -> dict[str, torch.Tensor]:
    """Mean and variance of p_θ(x_{t−1} | x_t): the posterior mean at x̂_0 (clipped to [−1, 1]
    if asked), variance σ_t² = β_t ("fixed_large") or β̃_t ("fixed_small")."""
    check_choice("variance", variance, VARIANCES)
    pred_xstart, _ = predict_start_and_noise(schedule, model_output, x_t, t, prediction_type)
    if clip_denoised:
        pred_xstart = pred_xstart.clamp(-1.0, 1.0)
    mean, _ = q_posterior_mean_variance(schedule, pred_xstart, x_t, t)
    table = schedule.betas if variance == "fixed_large" else schedule.posterior_variance
    return {"mean": mean, "variance": extract(table, t, x_t), "pred_xstart": pred_xstart}


def _add_noise(mean: torch.Tensor, sigma: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    # σ = 0 on the last step (t = 0) whatever the variance choice; noise may be omitted only there.
    last = (t == 0).to(mean.device).reshape(sigma.shape)
    if noise is None:
        if not bool(last.all()):
            raise ValueError("noise is required when any timestep is > 0")
        return mean
    if noise.shape != mean.shape:
        raise ValueError(f"noise must have the shape of x_t {tuple(mean.shape)}, got {tuple(noise.shape)}")
    return mean + torch.where(last, torch.zeros_like(sigma), sigma) * noise


def p_sample(schedule: NoiseSchedule, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
             noise: torch.Tensor | None, clip_denoised: bool = True, variance: str = "fixed_large",
             prediction_type: str = "epsilon") -> torch.Tensor:
    """One ancestral step x_t → x_{t−1} = μ_θ + σ_t z (Algorithm 2, posterior-mean form)."""
    out = p_mean_variance(schedule, model_output, x_t, t, clip_denoised, variance, prediction_type)
    return _add_noise(out["mean"], out["variance"].sqrt(), t, noise)


def p_sample_algorithm2(schedule: NoiseSchedule, eps: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor | None, variance: str = "fixed_large") -> torch.Tensor:
    """Algorithm 2 line 4 literally: x_{t−1} = (x_t − β_t/√(1−ᾱ_t) ε)/√α_t + σ_t z (eq. 11, no clipping)."""
    check_choice("variance", variance, VARIANCES)
    _check(schedule, x_t, t, eps=eps)
    mean = ((x_t - extract(schedule.betas, t, x_t) / extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * eps)
            / extract(schedule.alphas, t, x_t).sqrt())
    table = schedule.betas if variance == "fixed_large" else schedule.posterior_variance
    return _add_noise(mean, extract(table, t, x_t).sqrt(), t, noise)


def ddim_sigma(schedule: NoiseSchedule, t: torch.Tensor, t_prev: torch.Tensor, eta: float,
               like: torch.Tensor) -> torch.Tensor:
    """σ(η) = η √((1−ᾱ_s)/(1−ᾱ_t)) √(1−ᾱ_t/ᾱ_s) for the step t → s (Song et al. 2021, eq. 16)."""
    alpha_bar_t = extract(schedule.alphas_cumprod, t, like)
    alpha_bar_s = _alpha_bar_prev(schedule, t_prev, like)
    return eta * torch.sqrt((1 - alpha_bar_s) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_s))


def _alpha_bar_prev(schedule: NoiseSchedule, t_prev: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # ᾱ_s with ᾱ = 1 "before" the first timestep (t_prev = −1), as after DDIM's last step.
    table = torch.cat([torch.ones(1, dtype=torch.float64), schedule.alphas_cumprod])
    return extract(table, t_prev + 1, like)


def ddim_step(schedule: NoiseSchedule, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
              t_prev: torch.Tensor, noise: torch.Tensor | None, eta: float = 0.0, clip_denoised: bool = True,
              prediction_type: str = "epsilon") -> torch.Tensor:
    """DDIM's update from timestep t to the previous kept timestep s = t_prev (−1 after the last
    step): x_s = √ᾱ_s x̂_0 + √(1−ᾱ_s−σ²) ε + σ z (eq. 12). With clipping, ε is re-derived from
    the clipped x̂_0 so that x̂_0 and ε stay consistent."""
    if not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
    if t_prev.shape != t.shape or bool((t_prev >= t).any()) or bool((t_prev < -1).any()):
        raise ValueError("t_prev must have the shape of t and satisfy -1 <= t_prev < t")
    pred_xstart, eps = predict_start_and_noise(schedule, model_output, x_t, t, prediction_type)
    if clip_denoised:
        pred_xstart = pred_xstart.clamp(-1.0, 1.0)
        eps = predict_noise_from_start(schedule, x_t, t, pred_xstart)
    sigma = ddim_sigma(schedule, t, t_prev, eta, x_t)
    alpha_bar_s = _alpha_bar_prev(schedule, t_prev, x_t)
    mean = alpha_bar_s.sqrt() * pred_xstart + torch.sqrt((1 - alpha_bar_s - sigma ** 2).clamp_min(0)) * eps
    if eta == 0.0:
        return mean
    return _add_noise(mean, sigma, t, noise)


def training_losses(model, schedule: NoiseSchedule, x_start: torch.Tensor, t: torch.Tensor,
                    noise: torch.Tensor) -> torch.Tensor:
    """L_simple per example: mean over pixels of ‖ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t)‖² (eq. 14, Algorithm 1)."""
    x_t = q_sample(schedule, x_start, t, noise)
    return ((noise - model(x_t, t)) ** 2).flatten(1).mean(dim=1)
