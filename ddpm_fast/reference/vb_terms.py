"""The variational bound of Ho et al. 2020 (eq. 5) term by term, written from the paper's
equations with improved-diffusion's names (DESIGN §2.6): what the fused vb_terms op computes,
run in float64.

    L_T     = KL(q(x_T | x_0) ‖ N(0, I))                      prior_kl
    L_{t−1} = KL(q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t))  normal_kl of eqs. 6–7 against p_mean_variance
    L_0     = −log p_θ(x_0 | x_1)                             discretized_gaussian_log_likelihood (eq. 13)

All in nats, summed over a sample's dimensions.
"""
from __future__ import annotations

import torch

from ..contract import BIN_HALF_WIDTH, EDGE_BIN, PREDICTION_TYPES, SIGMA1_CONVENTIONS, VARIANCES, check_choice
from ..schedule import NoiseSchedule
from .diffusion import extract, p_mean_variance, q_posterior_mean_variance, q_sample


def model_variance(schedule: NoiseSchedule, variance: str, sigma1: str) -> torch.Tensor:
    """σ_t² of p_θ(x_{t−1} | x_t) for every timestep (float64 [T]): β_t ("fixed_large") or β̃_t
    ("fixed_small"), and at the first timestep the decoder's σ_1² of the convention `sigma1`
    (DESIGN §2.6): β_1 ("paper", fixed_large) or β̃ of the second timestep (β̃_1 = 0 makes
    fixed_small's decoder a point mass, so both conventions take it there)."""
    check_choice("variance", variance, VARIANCES)
    check_choice("sigma1", sigma1, SIGMA1_CONVENTIONS)
    if schedule.num_timesteps < 2:
        raise ValueError("the bound needs T >= 2 timesteps (σ_1 is taken from the second)")
    table = (schedule.betas if variance == "fixed_large" else schedule.posterior_variance).clone()
    if variance == "fixed_small" or sigma1 == "improved-diffusion":
        table[0] = schedule.posterior_variance[1]
    return table


def normal_kl(mean1: torch.Tensor, var1: torch.Tensor, mean2: torch.Tensor, var2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, var1) ‖ N(mean2, var2)) per element, in nats."""
    return 0.5 * (torch.log(var2 / var1) + var1 / var2 + (mean1 - mean2) ** 2 / var2 - 1.0)


def discretized_gaussian_log_likelihood(x0: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """log ∫ N(x; mean, σ²) over x_0's bin [x_0 − 1/255, x_0 + 1/255], the edge bins extended to
    ±∞ (eq. 13), per element: log(Φ(b) − Φ(a)), for a bin beside the mean from the log-CDF of its
    nearer tail (log Φ(b) + log(1 − e^{log Φ(a) − log Φ(b)}), mirrored above the mean), so that it
    neither cancels (1 − 1) nor underflows (a mean many σ away)."""
    lower = torch.where(x0 < -EDGE_BIN, torch.full_like(x0, -torch.inf), (x0 - BIN_HALF_WIDTH - mean) / sigma)
    upper = torch.where(x0 > EDGE_BIN, torch.full_like(x0, torch.inf), (x0 + BIN_HALF_WIDTH - mean) / sigma)
    above = lower > 0  # mirrored: Φ(b) − Φ(a) = Φ(−a) − Φ(−b)
    a, b = torch.where(above, -upper, lower), torch.where(above, -lower, upper)
    log_b = torch.special.log_ndtr(b)
    tail = log_b + torch.log(-torch.expm1(torch.special.log_ndtr(a) - log_b))
    straddle = torch.log(torch.special.ndtr(upper) - torch.special.ndtr(lower))
    return torch.where(b <= 0, tail, straddle)


def prior_kl(schedule: NoiseSchedule, x0: torch.Tensor) -> torch.Tensor:
    """L_T = KL(q(x_T | x_0) ‖ N(0, I)) per sample [B], q(x_T | x_0) = N(√ᾱ_T x_0, (1 − ᾱ_T) I) (eq. 4)."""
    last = torch.full((x0.shape[0],), schedule.num_timesteps - 1, dtype=torch.int64)
    mean = extract(schedule.sqrt_alphas_cumprod, last, x0) * x0
    var = extract(1.0 - schedule.alphas_cumprod, last, x0).expand_as(x0)
    return normal_kl(mean, var, torch.zeros_like(x0), torch.ones_like(x0)).flatten(1).sum(1)


def prediction_target(schedule: NoiseSchedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                      prediction_type: str) -> torch.Tensor:
    """What the network output estimates: ε, x_0, or v = √ᾱ_t ε − √(1−ᾱ_t) x_0."""
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "x0":
        return x0
    return (extract(schedule.sqrt_alphas_cumprod, t, x0) * noise
            - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * x0)


def vb_terms(schedule: NoiseSchedule, x0: torch.Tensor, noise: torch.Tensor, model_output: torch.Tensor,
             t: torch.Tensor, variance: str = "fixed_large", clip_denoised: bool = True,
             prediction_type: str = "epsilon", sigma1: str = "paper") -> torch.Tensor:
    """Per sample [B, 3] in x0's dtype: (the bound's term at 0-based timestep t — L_{t−1} for t ≥ 1,
    L_0 at t = 0 — in nats; Σ(x_0 − x̂_0)², the distortion of the model's x̂_0, clipped when
    clip_denoised; Σ(out − target)², the error of the network output against what it predicts),
    with x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε (eq. 4) the input the network gave model_output for."""
    x0, noise, model_output = (v.to(x0.dtype) for v in (x0, noise, model_output))
    x_t = q_sample(schedule, x0, t, noise)
    true_mean, true_var = q_posterior_mean_variance(schedule, x0, x_t, t)
    p = p_mean_variance(schedule, model_output, x_t, t, clip_denoised, variance, prediction_type)
    var = extract(model_variance(schedule, variance, sigma1), t, x0)
    kl = normal_kl(true_mean, true_var, p["mean"], var)
    decoder_nll = -discretized_gaussian_log_likelihood(x0, p["mean"], var.sqrt())
    first = (t == 0).to(x0.device).reshape(-1, *([1] * (x0.dim() - 1)))
    term = torch.where(first, decoder_nll, kl).flatten(1).sum(1)
    distortion = ((x0 - p["pred_xstart"]) ** 2).flatten(1).sum(1)
    error = ((model_output - prediction_target(schedule, x0, noise, t, prediction_type)) ** 2).flatten(1).sum(1)
    return torch.stack([term, distortion, error], dim=1)


def vb_terms_row(x_start: torch.Tensor, noise: torch.Tensor, model_output: torch.Tensor,
                 row: torch.Tensor) -> torch.Tensor:
    """What the fused op computes from a row (B, P, Q, clip, c1, inv_sigma, kl_const, decoder:
    contract.TERM_COLUMNS), in float64: d = out − (P·x_0 + Q·ε), x̂0 = x_0 + B·d (clipped when
    clip), err = x_0 − x̂0; the term is D·kl_const + ½(c1·inv_sigma)²·Σerr², or on the decoder row
    eq. 13 with x_0 − μ = c1·err. [B, 3] as vb_terms."""
    x0, eps, out = (t.to(torch.float64) for t in (x_start, noise, model_output))
    B, P, Q, clip, c1, inv_sigma, kl_const, decoder = row.to(torch.float64).tolist()
    d = out - (P * x0 + Q * eps)
    err = -B * d
    if clip:
        x0_hat = x0 + B * d
        err = torch.where(x0_hat < -1, x0 + 1, torch.where(x0_hat > 1, x0 - 1, err))
    sse, sqe = (err ** 2).flatten(1).sum(1), (d ** 2).flatten(1).sum(1)
    if decoder:
        term = -discretized_gaussian_log_likelihood(x0, x0 - c1 * err, torch.tensor(1 / inv_sigma, dtype=torch.float64)).flatten(1).sum(1)
    else:
        term = x0[0].numel() * kl_const + 0.5 * (c1 * inv_sigma) ** 2 * sse
    return torch.stack([term, sse, sqe], dim=1)
