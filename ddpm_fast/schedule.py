"""NoiseSchedule: β_1..β_T and every table derived from them (Ho et al. 2020, DESIGN §2).

Tables are computed once in float64 on the CPU and named after their formulas; callers
cast them when they move them to a device. Timesteps are 0-based as in the original code:
index i holds the paper's t = i + 1.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import dpm_solver
from .contract import (LEARNED_VARIANCES, METHODS, MULTISTEP_METHODS, PREDICTION_TYPES, SAMPLING_VARIANCES, SPACINGS,
                       STEP_COLUMNS, UINT32_RANGE, check_choice)


class NoiseSchedule:
    """A variance schedule β_1..β_T with its derived tables (all float64 CPU tensors of length T)."""

    def __init__(self, betas: torch.Tensor, zero_terminal_snr: bool = False):
        """zero_terminal_snr=True admits β_T = 1 (ᾱ_T = 0), as diffusers' rescale_betas_zero_snr gives."""
        betas = torch.as_tensor(betas)
        if betas.is_complex() or betas.dtype == torch.bool:
            raise TypeError(f"betas must be real numbers, got {betas.dtype}")
        betas = betas.to(torch.float64).cpu()
        if betas.dim() != 1 or betas.numel() < 1:
            raise ValueError(f"betas must be a 1-D tensor with T >= 1 entries, got shape {tuple(betas.shape)}")
        # β_T = 1 (ᾱ_T = 0, zero terminal SNR: Lin et al. 2024) only when asked for, at the last timestep
        inside = (betas > 0) & (betas < 1)
        if zero_terminal_snr:
            inside[-1] = betas[-1] == 1 or inside[-1]
        if not torch.isfinite(betas).all() or not inside.all():
            last = ", the last in (0, 1]" if zero_terminal_snr else " (β_T = 1 needs zero_terminal_snr=True)"
            raise ValueError(f"every beta must lie in (0, 1){last}, got min {betas.min().item()}, "
                             f"max {betas.max().item()}")
        self.betas = betas
        self.num_timesteps = betas.numel()
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        # q(x_t | x_0), eq. 4
        self.sqrt_alphas_cumprod = torch.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = torch.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = torch.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = torch.sqrt(1.0 / self.alphas_cumprod - 1.0)
        # q(x_{t-1} | x_t, x_0), eqs. 6-7
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef1 = betas * torch.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * torch.sqrt(self.alphas) / (1.0 - self.alphas_cumprod)

    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "NoiseSchedule":
        """The paper's schedule: β linear from beta_start to beta_end over T steps."""
        _check_T(T)
        if not 0 < beta_start <= beta_end < 1:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}")
        return cls(torch.linspace(beta_start, beta_end, T, dtype=torch.float64))

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> "NoiseSchedule":
        """Improved DDPM's schedule (Nichol & Dhariwal 2021, eq. 17): ᾱ(t) = cos²((t/T + s)/(1 + s)·π/2),
        β_t = min(1 − ᾱ(t)/ᾱ(t−1), max_beta)."""
        _check_T(T)
        t = torch.arange(T + 1, dtype=torch.float64) / T
        alpha_bar = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        return cls(torch.clamp(1 - alpha_bar[1:] / alpha_bar[:-1], max=max_beta))

    def check_timesteps(self, t: torch.Tensor) -> None:
        """Raise unless t is an integer tensor of timesteps in [0, T)."""
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"timesteps must be an integer tensor, got {t.dtype}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(f"timesteps must lie in [0, {self.num_timesteps}), got min {int(t.min())}, max {int(t.max())}")

    def timesteps(self, steps: int | Sequence[int] | None = None, spacing: str = "uniform") -> list[int]:
        """The kept timesteps, in sampling order (descending): all T by default, or a DDIM
        subsequence of `steps` — "uniform" or "leading" (i·⌊T/steps⌋), diffusers' "trailing"
        (round(T − i·T/steps) − 1) and "linspace" (round(i·(T−1)/(steps−1))), each as diffusers'
        DDIMScheduler.set_timesteps computes it (with steps_offset 0), or "quadratic"
        (⌊(i·√(0.8T)/(steps−1))²⌋, Song et al. 2021, without repeats: at most `steps`) — or
        `steps` itself when it is a sequence (e.g. a diffusers scheduler's own timesteps), or, when
        `steps` is a string, guided-diffusion's respacing of it (space_timesteps: "250", "ddim25",
        "10,15,20")."""
        T = self.num_timesteps
        if isinstance(steps, str):
            return sorted(space_timesteps(T, steps), reverse=True)
        if isinstance(steps, (list, tuple, torch.Tensor)):
            kept = [int(t) for t in (steps.tolist() if isinstance(steps, torch.Tensor) else steps)]
            if not kept or any(not 0 <= t < T for t in kept) or any(a <= b for a, b in zip(kept, kept[1:])):
                raise ValueError(f"explicit timesteps must be a non-empty, strictly descending sequence in "
                                 f"[0, {T}), got {kept[:8]}{' ...' if len(kept) > 8 else ''}")
            return kept
        if steps is None or steps == T:
            return list(range(T - 1, -1, -1))
        if not isinstance(steps, int) or not 1 <= steps <= T:
            raise ValueError(f"steps must be an int in [1, {T}], got {steps!r}")
        if spacing in ("uniform", "leading"):
            kept = [i * (T // steps) for i in range(steps)]
        elif spacing == "trailing":
            kept = (np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1)[::-1].tolist()
        elif spacing == "linspace":
            kept = np.linspace(0, T - 1, steps).round().astype(np.int64).tolist()
        elif spacing == "quadratic":
            # Near t = 0 the squares can repeat an integer; DDIM's code runs a repeated
            # timestep as a step from t to t, which returns x_t unchanged (ᾱ_s = ᾱ_t, σ = 0),
            # so dropping repeats gives the same samples with fewer network evaluations.
            kept = sorted(set((np.linspace(0, math.sqrt(T * 0.8), steps) ** 2).astype(np.int64).tolist()))
        else:
            check_choice("spacing", spacing, SPACINGS)
        return kept[::-1]

    def step_table(self, method: str = "ddpm", variance: str = "fixed_large", clip_denoised: bool = True,
                   prediction_type: str = "epsilon", steps: int | Sequence[int] | None = None, eta: float = 0.0,
                   spacing: str | None = None, *, order: int = 2, stochastic: bool = False, karras: bool = False,
                   final_sigma: str = "zero", lower_order_final: bool = True,
                   guidance_scale: float | Sequence[float] = 0.0, classifier_scale: float = 0.0) -> "StepTable":
        """The float64 coefficient rows (contract.STEP_COLUMNS) of a run, in sampling order.

        DDPM and DDIM: `steps` kept timesteps (all T by default) by `spacing` (default "uniform",
        see timesteps()). DPM-Solver++ ("dpm-solver++", or "dpm-solver++-sde" = stochastic=True):
        `steps` (default 20) model evaluations at diffusers' DPMSolverMultistepScheduler timesteps
        (spacing default "linspace", contract.DPM_SPACINGS; karras=True for Karras sigmas), of
        solver order `order` (1 or 2), final σ "zero" or "sigma_min", and diffusers'
        lower_order_final (DESIGN §2.4).

        Guidance (DESIGN §2.5) fills the columns w, Gout and Gmean: guidance_scale is the
        classifier-free weight w ≥ 0 (one for every row, or one per row), classifier_scale the
        classifier-guidance scale s ≥ 0 — as a shift of the mean by s·Σ_t·g on DDPM rows
        (Dhariwal & Nichol 2021, Algorithm 1) and of ε by −s·√(1−ᾱ_t)·g on every other row
        (their Algorithm 2 / eq. 14), written in the network output's own parametrisation.

        variance "learned_range" or "learned" (the network's variance channels, Nichol & Dhariwal
        2021 eq. 15) makes the DDPM rows learned-variance rows (DESIGN §2.3: columns learned,
        log_beta, log_beta_tilde); DDIM and DPM-Solver++ rows ignore it, as guided-diffusion and
        diffusers do."""
        for name, value, choices in (("method", method, METHODS), ("variance", variance, SAMPLING_VARIANCES),
                                     ("prediction_type", prediction_type, PREDICTION_TYPES)):
            check_choice(name, value, choices)
        if method in MULTISTEP_METHODS:
            rows, kept, vp = self._dpm_solver_rows(method == "dpm-solver++-sde" or stochastic, clip_denoised,
                                                   prediction_type, 20 if steps is None else steps,
                                                   "linspace" if spacing is None else spacing, order, karras,
                                                   final_sigma, lower_order_final, eta)
            return _table(_guided(rows, vp, None, guidance_scale, classifier_scale), kept, kept)
        if stochastic or karras or order != 2 or final_sigma != "zero" or not lower_order_final:
            raise ValueError(f"order, stochastic, karras, final_sigma and lower_order_final belong to the "
                             f"DPM-Solver methods {MULTISTEP_METHODS}, not method={method!r}")
        spacing = "uniform" if spacing is None else spacing
        if not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
        if method == "ddpm" and eta != 0.0:
            raise ValueError(f"method='ddpm' takes no eta (its variance is set by `variance`), got eta={eta}; "
                             f"for DDIM's η use method='ddim'")
        kept = self.timesteps(steps, spacing)
        learned = method == "ddpm" and variance in LEARNED_VARIANCES
        if learned and len(kept) < 2:
            raise ValueError(f"variance={variance!r} needs at least two DDPM steps: the last step's clipped log β̃ is "
                             f"the step before's (improved-diffusion's posterior_log_variance_clipped), got {len(kept)}")
        ab = self.alphas_cumprod.tolist()
        rows, vp, shifts, chain = [], [], [], []
        for index, t in enumerate(kept):
            ab_s = ab[kept[index + 1]] if index + 1 < len(kept) else 1.0  # ᾱ at the next kept timestep
            sqrt_ab, sqrt_1m_ab = math.sqrt(ab[t]), math.sqrt(1.0 - ab[t])
            A, B, Fx, Fo = output_coefs(ab[t], prediction_type, t)
            if method == "ddpm" and len(kept) == self.num_timesteps:  # μ̃_t(x_t, x̂0), eq. 7; σ² = β_t or β̃_t
                C, D, E = self.posterior_mean_coef1[t].item(), self.posterior_mean_coef2[t].item(), 0.0
                beta, beta_tilde = self.betas[t].item(), self.posterior_variance[t].item()
            elif method == "ddpm":
                # Respaced DDPM (Nichol & Dhariwal 2021 §4; diffusers' DDPMScheduler with fewer
                # inference steps): eqs. 6-7 for the chain of kept timesteps, whose β'_t =
                # 1 − ᾱ_t/ᾱ_s. The full chain above uses the exact tables instead, since
                # 1 − ᾱ_t/ᾱ_{t−1} loses ~12 digits of β_t to cancellation.
                beta = 1.0 - ab[t] / ab_s
                C, D, E = beta * math.sqrt(ab_s) / (1.0 - ab[t]), (1.0 - ab_s) * math.sqrt(1.0 - beta) / (1.0 - ab[t]), 0.0
                beta_tilde = beta * (1.0 - ab_s) / (1.0 - ab[t])
            else:  # DDIM towards the previous kept timestep s (ᾱ_s = 1 after the last)
                C, D, E, sigma = ddim_coefs(ab[t], ab_s, eta, Fx, Fo, clip_denoised)
            if method == "ddpm":
                chain.append((beta, beta_tilde))
                # a learned row's noise is σ·√Σ_θ·z with Σ_θ per element: σ = 1 here (DESIGN §2.3)
                sigma = 1.0 if learned else math.sqrt(beta if variance == "fixed_large" else beta_tilde)
            vp.append((sqrt_ab, sqrt_1m_ab))
            if method == "ddpm":
                shifts.append(sigma ** 2)  # Σ_t of classifier guidance's mean shift, before the last step's σ = 0
            elif clip_denoised and sqrt_ab > 0:
                # guided-diffusion's DDIM shifts the ε re-derived from the clipped x̂0 and does not clip
                # again: ε' = ε(clip x̂0) − s·σ_t·g moves x̂0 by s(1−ᾱ_t)/√ᾱ_t·g and the ε term by −c·s·σ_t·g,
                # c = D·σ_t (ddim_coefs' k), so x_prev moves by s·(1−ᾱ_t)(√ᾱ_s/√ᾱ_t − D)·g (DESIGN §2.5)
                shifts.append((1.0 - ab[t]) * (math.sqrt(ab_s) / sqrt_ab - D))
            else:
                shifts.append(None)  # ε̂ = ε − s·σ_t·g through the output (eq. 14)
            if t == 0:
                sigma = 0.0  # no noise on the last step, whatever the variance choice
            rows.append((A, B, C, D, E, sigma, float(clip_denoised), 0.0))
        rows = _guided(rows, vp, shifts, guidance_scale, classifier_scale)
        return _table(rows, kept, kept, _learned_columns(variance, chain) if learned else None)

    def _dpm_solver_rows(self, stochastic: bool, clip_denoised: bool, prediction_type: str, steps, spacing: str,
                         order: int, karras: bool, final_sigma: str, lower_order_final: bool, eta: float):
        if eta != 0.0:
            raise ValueError(f"DPM-Solver++ takes no eta (its SDE variant is method='dpm-solver++-sde'), got eta={eta}")
        if not isinstance(steps, int) or isinstance(steps, bool):
            raise ValueError(f"DPM-Solver++ takes a number of steps (its timesteps follow `spacing`), got {steps!r}")
        rows, kept, vp = dpm_solver.rows(self.alphas_cumprod, steps, spacing, karras, order, stochastic,
                                         prediction_type, clip_denoised, final_sigma, lower_order_final)
        # z of the SDE variant is keyed by the row's timestep, as for DDPM (DESIGN §3): a run that
        # repeats a timestep (Karras σ rounded to the same t) would reuse its noise
        if stochastic and len(set(kept)) != len(kept):
            raise ValueError(f"the SDE variant needs distinct timesteps (its noise is keyed by them); {steps} Karras "
                             f"or λ-uniform steps round two σ to the same timestep: use fewer steps")
        return rows, kept, vp

    def __repr__(self) -> str:
        return (f"NoiseSchedule(T={self.num_timesteps}, beta_1={self.betas[0].item():.3g}, "
                f"beta_T={self.betas[-1].item():.3g})")


def space_timesteps(T: int, sections: str) -> set[int]:
    """The timesteps guided-diffusion's and improved-diffusion's `--timestep_respacing` keeps (their
    respace.space_timesteps, DESIGN §2.3): "ddimN" keeps range(0, T, k) for the integer stride k
    that gives exactly N; "n1,n2,…" splits [0, T) into equal sections (the first T mod #sections
    one longer) and keeps n_i points of section i at the fractional stride (size − 1)/(n_i − 1),
    rounded by Python's round() (half to even), as theirs are: a checkpoint's published FID was
    sampled at exactly these timesteps."""
    text = sections.strip()
    if text.startswith("ddim"):
        count = _positive_count(text[len("ddim"):], sections)
        for stride in range(1, T):
            if len(range(0, T, stride)) == count:
                return set(range(0, T, stride))
        raise ValueError(f"respacing {sections!r}: no integer stride keeps exactly {count} of {T} timesteps")
    counts = [_positive_count(part, sections) for part in text.split(",")]
    if len(counts) > T:
        raise ValueError(f"respacing {sections!r}: {len(counts)} sections do not fit in {T} timesteps")
    size, extra = divmod(T, len(counts))
    kept, start = set(), 0
    for i, count in enumerate(counts):
        length = size + (i < extra)
        if count > length:
            raise ValueError(f"respacing {sections!r}: section {i} has {length} timesteps, fewer than {count}")
        stride = 1.0 if count == 1 else (length - 1) / (count - 1)
        position = 0.0
        for _ in range(count):  # summed, not j·stride: the float sum's rounding decides near-ties, as in theirs
            kept.add(start + round(position))
            position += stride
        start += length
    return kept


def _positive_count(text: str, sections: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise ValueError(f"respacing must be \"ddimN\" or comma-separated counts ≥ 1 (e.g. \"250\", "
                         f"\"10,15,20\"), got {sections!r}")
    return int(text)


def output_coefs(ab: float, prediction_type: str, t: int) -> tuple[float, float, float, float]:
    """(A, B, Fx, Fo) at ᾱ_t = ab: x̂0 = A·x + B·out and ε = Fx·x + Fo·out for the kind of network
    output (DESIGN §2.3's table)."""
    sqrt_ab, sqrt_1m_ab = math.sqrt(ab), math.sqrt(1.0 - ab)
    if prediction_type == "epsilon":
        if sqrt_ab == 0.0:
            raise ValueError(f"ᾱ = 0 at timestep {t} (zero terminal SNR): epsilon prediction gives "
                             f"x̂0 = (x − ε)/0 there; use prediction_type 'v' or 'x0'")
        return 1.0 / sqrt_ab, -sqrt_1m_ab / sqrt_ab, 0.0, 1.0
    if prediction_type == "x0":
        return 0.0, 1.0, 1.0 / sqrt_1m_ab, -sqrt_ab / sqrt_1m_ab
    return sqrt_ab, -sqrt_1m_ab, sqrt_1m_ab, sqrt_ab


def ddim_coefs(ab: float, ab_s: float, eta: float, Fx: float, Fo: float,
               clipped_eps: bool) -> tuple[float, float, float, float]:
    """(C, D, E, σ) of DDIM's step from ᾱ_t = ab to ᾱ_s = ab_s (Song et al. 2021, eq. 12; DESIGN
    §2.3), ε = Fx·x + Fo·out, or with clipped_eps ε re-derived from the (clipped) x̂0:
    ε' = (x − √ᾱ_t x̂0)/√(1−ᾱ_t)."""
    sigma = eta * math.sqrt((1 - ab_s) / (1 - ab) * (1 - ab / ab_s))
    c_eps = math.sqrt(max(1.0 - ab_s - sigma ** 2, 0.0))
    if clipped_eps:
        k = c_eps / math.sqrt(1.0 - ab)
        return math.sqrt(ab_s) - k * math.sqrt(ab), k, 0.0, sigma
    return math.sqrt(ab_s), c_eps * Fx, c_eps * Fo, sigma


def unguided_table(rows: list[tuple[float, ...]], timesteps: list[int]) -> "StepTable":
    """A table of rows (A, B, C, D, E, σ, clip, H) without guidance (w = Gout = Gmean = 0) nor a
    learned variance, each row's noise keyed by its timestep (DESIGN §3.2)."""
    return _table([(*row, 0.0, 0.0, 0.0) for row in rows], timesteps, timesteps)


def _learned_columns(variance: str, chain: list[tuple[float, float]]) -> list[tuple[float, float, float]]:
    """(learned, log β_t, clipped log β̃_t) of each row of a DDPM chain given its (β_t, β̃_t) in
    sampling order: the respaced chain's own β and β̃, as guided-diffusion's SpacedDiffusion
    recomputes them from the kept ᾱ's. β̃ is 0 on the last row (ᾱ_s = 1), whose log β̃ is clipped
    to the row before's, as improved-diffusion's posterior_log_variance_clipped is (eq. 15's range
    then stays finite where the noise is off anyway)."""
    clipped = [beta_tilde for _, beta_tilde in chain[:-1]] + [chain[-2][1]]
    return [(LEARNED_VARIANCES[variance], math.log(beta), math.log(beta_tilde))
            for (beta, _), beta_tilde in zip(chain, clipped)]


def _guided(rows: list[tuple[float, ...]], vp: list[tuple[float, float]], mean_shifts: list[float | None] | None,
            guidance_scale: float | Sequence[float], classifier_scale: float) -> list[tuple[float, ...]]:
    """Rows with the guidance columns (w, Gout, Gmean) of DESIGN §2.5 appended. vp: each row's
    (α_t, σ_t) = (√ᾱ_t, √(1−ᾱ_t)); mean_shifts: per row, what s·g is multiplied by in x_prev (Σ_t
    of a DDPM row; a clipped DDIM row's shift) or None where classifier guidance shifts ε through
    the output (None for every row: the same)."""
    scales = [guidance_scale] * len(rows) if isinstance(guidance_scale, (int, float)) else list(guidance_scale)
    if len(scales) != len(rows) or any(isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < math.inf
                                       for w in scales):
        raise ValueError(f"guidance_scale must be a finite number >= 0 or one per step ({len(rows)}), got "
                         f"{guidance_scale!r}")
    s = classifier_scale
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s < math.inf:
        raise ValueError(f"classifier_scale must be a finite number >= 0, got {classifier_scale!r}")
    guided = []
    for i, (row, w, (alpha, sigma)) in enumerate(zip(rows, scales, vp)):
        shift = None if mean_shifts is None else mean_shifts[i]
        if shift is not None:  # μ + s·Σ·g (Algorithm 1), or a clipped DDIM row's equivalent
            g_out, g_mean = 0.0, s * shift
        elif s == 0:
            g_out, g_mean = 0.0, 0.0
        elif alpha == 0.0:
            raise ValueError("classifier guidance shifts ε by −s·√(1−ᾱ_t)·g, which moves x̂0 by s(1−ᾱ_t)/√ᾱ_t·g: "
                             "infinite at ᾱ_t = 0 (zero terminal SNR); use method='ddpm' or classifier_scale=0")
        else:
            # ε̂ = ε − s·σ_t·g (eq. 14). x̂0 = A·x + B·out gives ε = (x − α_t·x̂0)/σ_t, so ∂ε/∂out =
            # −α_t·B/σ_t and the output moves by s·σ_t²/(α_t·B)·g whatever it predicts.
            g_out, g_mean = s * sigma * sigma / (alpha * row[_B]), 0.0
        guided.append((*row, float(w), g_out, g_mean))
    return guided


def _table(rows: list[tuple[float, ...]], timesteps: list[int], noise_keys: list[int],
           learned: list[tuple[float, float, float]] | None = None) -> "StepTable":
    """The table of rows (A … Gmean) with their learned-variance columns (zeros: a fixed variance)."""
    columns = learned if learned is not None else [(0.0, 0.0, 0.0)] * len(rows)
    coefs = torch.tensor([(*row, *extra) for row, extra in zip(rows, columns)], dtype=torch.float64)
    if not torch.isfinite(coefs).all():
        raise ValueError("the schedule gives non-finite step coefficients")
    return StepTable(coefs, torch.tensor(timesteps, dtype=torch.int64), torch.tensor(noise_keys, dtype=torch.int64))


def _check_T(T: int) -> None:
    # x_T's noise key is T, a uint32 counter word (DESIGN §3.2)
    if not isinstance(T, int) or isinstance(T, bool) or not 1 <= T < UINT32_RANGE:
        raise ValueError(f"T must be an int in [1, 2^32), got {T!r}")


_A, _B, _CLIP, _H, _W, _GOUT, _LEARNED, _LOG_BETA, _LOG_BETA_TILDE = (
    STEP_COLUMNS.index(name) for name in ("A", "B", "clip", "H", "w", "Gout", "learned", "log_beta", "log_beta_tilde"))


def guided_output(row: torch.Tensor, out: torch.Tensor, uncond: torch.Tensor | None = None,
                  grad: torch.Tensor | None = None) -> torch.Tensor:
    """The network output the update uses under guidance (DESIGN §2.5), in out's dtype:
    (1 + w)·out − w·uncond with an unconditional output (Ho & Salimans 2022, eq. 6), then + Gout·g
    with a classifier gradient g (ε̂ of Dhariwal & Nichol 2021, eq. 14, in the output's own form)."""
    if uncond is not None:
        out = (1 + row[_W]) * out - row[_W] * uncond.to(out.dtype)
    return out if grad is None else out + row[_GOUT] * grad.to(out.dtype)


def learned_variance(row: torch.Tensor, variance_output: torch.Tensor) -> torch.Tensor:
    """Σ_θ per element of a learned row (DESIGN §2.3) from the network's variance channels v, in
    their dtype: exp(frac·log β_t + (1 − frac)·log β̃_t), frac = (v + 1)/2 ("learned_range",
    Nichol & Dhariwal 2021 eq. 15), or exp(v) ("learned"); 1 on any other row, which ignores v."""
    if row[_LEARNED] == LEARNED_VARIANCES["learned"]:
        return variance_output.exp()
    if row[_LEARNED] == LEARNED_VARIANCES["learned_range"]:
        frac = (variance_output + 1) / 2
        return (frac * row[_LOG_BETA] + (1 - frac) * row[_LOG_BETA_TILDE]).exp()
    return torch.ones_like(variance_output)


def x0_hat(row: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """x̂0 = A·x + B·out of one coefficient row (DESIGN §2), clipped to [−1, 1] when the row says
    so: the network's current estimate of x_0, whatever it predicts."""
    estimate = row[_A] * x + row[_B] * out
    return estimate.clamp(-1.0, 1.0) if row[_CLIP] != 0 else estimate


@dataclass(frozen=True)
class StepTable:
    """The coefficient rows of a sampling run, one per network evaluation, in sampling order.

    coefs: [S, len(STEP_COLUMNS)], DESIGN §2's unified update; timesteps: int64 [S], the model's
    0-based timestep; noise_keys: int64 [S], the noise key of the row's z (its timestep: DESIGN §3)."""
    coefs: torch.Tensor
    timesteps: torch.Tensor
    noise_keys: torch.Tensor

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> "StepTable":
        return StepTable(self.coefs.to(device=device, dtype=dtype), self.timesteps.to(device), self.noise_keys.to(device))

    def __len__(self) -> int:
        return self.timesteps.numel()

    @property
    def learned(self) -> bool:
        """Whether a row reads the network's variance channels (a learned variance, DESIGN §2.3)."""
        return bool((self.coefs[:, _LEARNED] != 0).any())

    @property
    def multistep(self) -> bool:
        """Whether a row reads the previous x̂0 (H ≠ 0): a run then needs a history buffer."""
        return bool((self.coefs[:, _H] != 0).any())

    def x0_hat(self, index: int, x: torch.Tensor, out: torch.Tensor, uncond: torch.Tensor | None = None,
               grad: torch.Tensor | None = None) -> torch.Tensor:
        """x̂0 at row `index` from x and the network output `out` (computed in x's dtype), guided
        by the unconditional output and the classifier gradient where given (guided_output)."""
        row = self.coefs[index].to(x.dtype)
        return x0_hat(row, x, guided_output(row, out.to(x.dtype), uncond, grad))
