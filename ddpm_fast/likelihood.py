"""The variational bound of Ho et al. 2020 (eq. 5) in bits/dim, term by term (DESIGN §2.6):
`Evaluator(model, schedule).bits_per_dim(x0, seed=...)`.

For each timestep the network sees x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε with ε drawn from the package's
noise stream under key NLL_NOISE_KEY_BASE + t for the image's global index (DESIGN §3), so an
image's bound is the same whatever batch, device or process computes it. One fused op
(ops.vb_terms) turns the network output into the image's term and the errors of x̂_0 and of
the output; L_T is closed-form.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .contract import (BACKENDS, NLL_NOISE_KEY_BASE, PREDICTION_TYPES, SIGMA1_CONVENTIONS,
                       UINT32_RANGE, VARIANCES, check_choice, check_samples)
from .ops import randn
from .ops.vb_terms import IMPLEMENTATIONS as TERM_IMPLEMENTATIONS
from .ops._dispatch import resolve
from .reference.diffusion import predict_start_and_noise
from .reference.vb_terms import model_variance, prior_kl
from .sampler import _own_dtype
from .schedule import NoiseSchedule
from .unet import UNet

LEVELS = 255  # data in [−1, 1] on the 8-bit grid: x = k·2/255 − 1, k = 0 … 255


def term_table(schedule: NoiseSchedule, variance: str = "fixed_large", clip_denoised: bool = True,
               prediction_type: str = "epsilon", sigma1: str = "paper") -> torch.Tensor:
    """The fused term op's rows for every timestep, float64 [T, 8] (contract.TERM_COLUMNS):
    x̂0 = A·x_t + B·out written as x_0 + B·(out − target), target = P·x_0 + Q·ε (the table of
    DESIGN §2.3 for ε, x_0 and v); c1 = posterior_mean_coef1, so that μ̃_t − μ_θ = c1·(x_0 − x̂0);
    inv_sigma = 1/σ_t (reference.vb_terms.model_variance, σ_1 by `sigma1`); kl_const =
    ½(log(σ_t²/β̃_t) + β̃_t/σ_t² − 1), the KL's per-dimension part that does not depend on the
    means; decoder = 1 on the first row (eq. 13)."""
    check_choice("variance", variance, VARIANCES)
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    a = schedule.alphas_cumprod
    sqrt_a, sqrt_1ma = schedule.sqrt_alphas_cumprod, schedule.sqrt_one_minus_alphas_cumprod
    ones, zeros = torch.ones_like(a), torch.zeros_like(a)
    B, P, Q = {"epsilon": (-sqrt_1ma / sqrt_a, zeros, ones), "x0": (ones, ones, zeros),
               "v": (-sqrt_1ma, -sqrt_1ma, sqrt_a)}[prediction_type]
    sigma2 = model_variance(schedule, variance, sigma1)
    # 1 − β̃_t/σ_t²: 0 for fixed_small; for fixed_large 1 − (1−ᾱ_{t−1})/(1−ᾱ_t) = ᾱ_{t−1}β_t/(1−ᾱ_t), written
    # so that ½(−x − log(1 − x)) keeps its digits where x is tiny (late timesteps)
    x = schedule.alphas_cumprod_prev * schedule.betas / (1 - a) if variance == "fixed_large" else zeros
    kl_const = 0.5 * (-x - torch.log1p(-x))
    kl_const[0] = 0.0  # the decoder row has no KL
    decoder = zeros.clone()
    decoder[0] = 1.0
    table = torch.stack([B, P, Q, torch.full_like(a, float(bool(clip_denoised))), schedule.posterior_mean_coef1,
                         sigma2.rsqrt(), kl_const, decoder], dim=1)
    if not torch.isfinite(table).all():
        raise ValueError(f"the bound is not finite for this schedule with {prediction_type}-prediction "
                         f"(ᾱ_T = {float(a[-1])}: zero terminal SNR leaves x̂_0 undefined)")
    return table


def strided_timesteps(T: int, count: int) -> tuple[list[int], list[float]]:
    """An estimate over `count` of the T timesteps, descending with weights: timestep 0 (the
    decoder, exact) and count − 1 timesteps in 1 … T−1 spaced evenly in log t (the terms fall
    by orders of magnitude over the first timesteps and change slowly after), whose weights sum
    the piecewise-linear interpolation of the KL terms over every integer timestep (the
    trapezoidal rule on the integers: segment [a, b] gives L_a (n+1)/2 + L_b (n−1)/2, n = b − a)."""
    if not isinstance(count, int) or isinstance(count, bool) or not 2 <= count <= T:
        raise ValueError(f"a timestep subset needs 2 <= K <= T = {T} timesteps (the decoder and at least one KL "
                         f"term), got {count!r}")
    if count == T:
        return list(range(T - 1, -1, -1)), [1.0] * T
    points = count - 1
    kept: list[int] = []
    while len(kept) < count - 1:  # log spacing repeats small integers: ask for more until count − 1 remain
        kept = sorted({round(math.exp(k * math.log(T - 1) / max(points - 1, 1))) for k in range(points)})
        points += 1
    weights = [0.0] * len(kept)
    for j, (a, b) in enumerate(zip(kept, kept[1:])):
        weights[j] += (b - a + 1) / 2
        weights[j + 1] += (b - a - 1) / 2
    weights[-1] += 1.0 if len(kept) > 1 else T - 1.0  # one KL term alone stands for all T − 1
    return kept[::-1] + [0], weights[::-1] + [1.0]


@dataclass
class Bound:
    """The bound of N images, term by term (bits/dim: nats / (D·ln 2)). Columns of the [N, K] arrays
    are `timesteps` (0-based, descending; timestep 0 is L_0, timestep t ≥ 1 is L_t of the paper's
    L_{t−1} numbering shifted by one: the KL at 0-based t). A strided estimate (estimate=True)
    weighs each KL column by `weights`."""
    timesteps: torch.Tensor  # int64 [K]
    weights: torch.Tensor    # float64 [K]
    prior: torch.Tensor      # float64 [N]: L_T
    terms: torch.Tensor      # float64 [N, K]: L_0 (at timestep 0) and the KL terms
    distortion: torch.Tensor  # float64 [N, K]: mean (x_0 − x̂_0)² over the dimensions, data on [−1, 1]
    mse: torch.Tensor        # float64 [N, K]: mean (out − target)² over the dimensions
    quantised: int = 0       # images that were not on the 8-bit grid and were moved onto it
    estimate: bool = False

    @property
    def bpd(self) -> torch.Tensor:
        """Bits/dim per image: L_T + Σ L_{t−1} + L_0."""
        return self.prior + (self.terms * self.weights).sum(1)

    @property
    def decoder(self) -> torch.Tensor:
        """L_0 per image, the distortion term of the paper's rate/distortion split."""
        return self.terms[:, self.timesteps == 0].sum(1)

    @property
    def rate(self) -> torch.Tensor:
        """L_T + Σ_{t≥2} L_{t−1} per image: the bits to send x_1 (the paper's rate)."""
        return self.bpd - self.decoder

    def rmse(self, column: int = -1) -> float:
        """RMSE of x̂_0 on the 0–255 scale over all images and dimensions at a column (default the
        last, timestep 0: the paper's distortion)."""
        return math.sqrt(float(self.distortion[:, column].mean())) * LEVELS / 2

    def curve(self) -> dict[str, torch.Tensor]:
        """Progressive lossy decompression (the paper's Figure 5), one entry per column: after
        receiving x_T … x_t the rate is L_T + Σ_{s>t} L_{s−1} (bits/dim, mean over images) and the
        distortion the RMSE (0–255) of x̂_0 from x_t."""
        kl = (torch.where(self.timesteps > 0, self.weights, torch.zeros_like(self.weights)) * self.terms).mean(0)
        sent = torch.cumsum(kl, 0) - kl  # the KL terms of the columns before (timesteps above) each
        return dict(timesteps=self.timesteps + 1, rate=float(self.prior.mean()) + sent,
                    distortion=self.distortion.mean(0).sqrt() * LEVELS / 2)

    def summary(self) -> dict:
        bpd = self.bpd
        n = bpd.numel()
        return dict(images=n, bpd=float(bpd.mean()), bpd_stderr=float(bpd.std() / math.sqrt(n)) if n > 1 else 0.0,
                    rate=float(self.rate.mean()), distortion_bpd=float(self.decoder.mean()), prior=float(self.prior.mean()),
                    rmse=self.rmse(), estimate=self.estimate, terms=len(self.timesteps), quantised=self.quantised)

    def arrays(self) -> dict[str, torch.Tensor]:
        """Per-image arrays for an .npz (bpd and every term)."""
        return dict(bpd=self.bpd, prior=self.prior, rate=self.rate, decoder=self.decoder, terms=self.terms,
                    distortion=self.distortion, mse=self.mse, timesteps=self.timesteps, weights=self.weights)


class Evaluator:
    """The variational bound of a noise-prediction model in bits/dim (DESIGN §2.6).

    model: a callable (x_t [B, C, H, W], t [B] int64[, y [B] int64]) → out, as Sampler takes;
    a class-conditional UNet is evaluated given labels (or ∅ = num_classes). variance:
    "fixed_large" (σ_t² = β_t) or "fixed_small" (β̃_t); clip_denoised: the clipping of x̂_0 in
    p_θ's mean (the sampler's default); prediction_type: "epsilon", "x0" or "v"; sigma1: the
    decoder's σ_1 convention, "paper" (σ_1² = β_1 with fixed_large, the default) or
    "improved-diffusion" (β̃ of the second timestep); backend for the fused term op and the noise.
    """

    def __init__(self, model: Callable, schedule: NoiseSchedule, variance: str = "fixed_large",
                 clip_denoised: bool = True, prediction_type: str = "epsilon", sigma1: str = "paper",
                 backend: str = "auto", sample_shape: tuple[int, int, int] | None = None):
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        check_choice("sigma1", sigma1, SIGMA1_CONVENTIONS)
        check_choice("backend", backend, BACKENDS)
        if NLL_NOISE_KEY_BASE + schedule.num_timesteps > UINT32_RANGE:
            raise ValueError(f"the bound's noise keys 2^31 + t need T <= 2^31, got T = {schedule.num_timesteps}")
        self.model, self.schedule, self.backend = model, schedule, backend
        self.prediction_type, self.clip_denoised = prediction_type, bool(clip_denoised)
        self.table = term_table(schedule, variance, clip_denoised, prediction_type, sigma1)
        self.num_classes = model.num_classes if isinstance(model, UNet) else None
        self.sample_shape = tuple(sample_shape) if sample_shape is not None else (
            (model.in_channels, model.resolution, model.resolution) if isinstance(model, UNet) else None)
        # what decides the bound besides the model, the images and the seed (an evaluation job's manifest)
        self.config = dict(variance=variance, clip_denoised=self.clip_denoised, prediction_type=prediction_type,
                           sigma1=sigma1, timesteps=schedule.num_timesteps)

    @property
    def device(self) -> torch.device:
        """The model's device (its first parameter's; the CPU for a callable without parameters)."""
        parameters = self.model.parameters() if isinstance(self.model, torch.nn.Module) else iter(())
        return next((tensor.device for tensor in parameters), torch.device("cpu"))

    @property
    def resolved_backend(self) -> str:
        return resolve("vb_terms", self.backend, self.device, TERM_IMPLEMENTATIONS)

    @torch.inference_mode()
    def bits_per_dim(self, x0: torch.Tensor, seed: int = 0, sample_offset: int = 0,
                     labels: int | Sequence[int] | torch.Tensor | None = None, timesteps: int | None = None,
                     batch_size: int | None = None, progress: bool | tqdm = False) -> Bound:
        """The bound of images x0 (float [N, C, H, W] in [−1, 1]; images off the 8-bit grid are
        quantised first and counted in Bound.quantised) as global images sample_offset …
        sample_offset + N − 1 of `seed`'s noise. timesteps: None for the full T-term bound, or K
        for a strided estimate over K timesteps (strided_timesteps). labels: one class (or ∅ =
        num_classes) for all, or one per image, for a class-conditional model."""
        x0, quantised = self.check_images(x0)
        n = x0.shape[0]
        check_samples(seed, sample_offset, n)
        y = self._check_labels(labels, n)
        T = self.schedule.num_timesteps
        steps, weights = strided_timesteps(T, T if timesteps is None else timesteps)
        batch_size = n if batch_size is None else batch_size
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        backend = self.resolved_backend
        terms = TERM_IMPLEMENTATIONS[backend]
        noise_impl = "reference" if backend == "reference" else "auto"
        rows = self.table.to(self.device)
        results = torch.empty(n, len(steps), 3, dtype=torch.float64, device=self.device)  # read once, at the end
        bar = progress if isinstance(progress, tqdm) else tqdm(total=n * len(steps), disable=not progress,
                                                               unit="eval")
        with bar if bar is not progress else contextlib.nullcontext(), _eval_mode(self.model):
            for first in range(0, n, batch_size):
                x = x0[first:first + batch_size].to(self.device)
                labels_b = None if y is None else y[first:first + batch_size].to(self.device)
                for k, t in enumerate(steps):
                    eps = randn(x.shape, seed=seed, step=NLL_NOISE_KEY_BASE + t, sample_offset=sample_offset + first,
                                device=self.device, impl=noise_impl)
                    out = self._output(self._q_sample(x, eps, t), t, labels_b)
                    results[first:first + x.shape[0], k] = terms(x, eps, out, rows[t])
                    bar.update(x.shape[0])
        results = results.cpu()
        to_bits = 1.0 / (math.prod(x0.shape[1:]) * math.log(2.0))
        return Bound(timesteps=torch.tensor(steps), weights=torch.tensor(weights, dtype=torch.float64),
                     prior=prior_kl(self.schedule, x0.double()) * to_bits, terms=results[..., 0] * to_bits,
                     distortion=results[..., 1] / math.prod(x0.shape[1:]), mse=results[..., 2] / math.prod(x0.shape[1:]),
                     quantised=quantised, estimate=timesteps is not None and timesteps < T)

    @torch.inference_mode()
    def denoised(self, x0: torch.Tensor, timesteps: Sequence[int], seed: int = 0, sample_offset: int = 0,
                 labels: int | Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Progressive lossy decompression: x̂_0 from x_t (eq. 15, clipped as the bound's p_θ is) at
        each of `timesteps` (0-based) for each image, with the bound's own x_t: float32
        [N, len(timesteps), C, H, W]."""
        x0, _ = self.check_images(x0)
        y = self._check_labels(labels, x0.shape[0])
        x = x0.to(self.device)
        frames = []
        with _eval_mode(self.model):
            for t in timesteps:
                eps = randn(x.shape, seed=seed, step=NLL_NOISE_KEY_BASE + t, sample_offset=sample_offset,
                            device=self.device)
                x_t = self._q_sample(x, eps, t)
                out = self._output(x_t, t, None if y is None else y.to(self.device)).float()
                steps = torch.full((x.shape[0],), t, dtype=torch.int64, device=self.device)
                x0_hat, _ = predict_start_and_noise(self.schedule, out, x_t, steps, self.prediction_type)
                frames.append((x0_hat.clamp(-1, 1) if self.clip_denoised else x0_hat).cpu())
        return torch.stack(frames, dim=1)

    def _q_sample(self, x0: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
        # x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε (eq. 4), in float32 as the network gets it
        return float(self.schedule.sqrt_alphas_cumprod[t]) * x0 + float(self.schedule.sqrt_one_minus_alphas_cumprod[t]) * eps

    def _output(self, x_t: torch.Tensor, t: int, y: torch.Tensor | None) -> torch.Tensor:
        dtype = _own_dtype(self.model)
        steps = torch.full((x_t.shape[0],), t, dtype=torch.int64, device=x_t.device)
        out = self.model(x_t.to(dtype), steps) if y is None else self.model(x_t.to(dtype), steps, y)
        out = getattr(out, "sample", out)  # diffusers returns UNet2DOutput
        if not isinstance(out, torch.Tensor) or out.shape != x_t.shape:
            raise ValueError(f"the model must return a tensor of the input's shape {tuple(x_t.shape)}, "
                             f"got {getattr(out, 'shape', type(out).__name__)}")
        return out if out.dtype in (torch.float32, torch.float16, torch.bfloat16) else out.float()

    def check_images(self, x0: torch.Tensor) -> tuple[torch.Tensor, int]:
        """x0 checked (float [N, C, H, W] of the model's shape, finite, in [−1, 1]) and rounded to the
        8-bit grid, with the number of images that were not on it."""
        if not isinstance(x0, torch.Tensor) or not x0.is_floating_point() or x0.dim() != 4:
            raise ValueError(f"images must be a float tensor [N, C, H, W], got "
                             f"{getattr(x0, 'dtype', type(x0).__name__)} {tuple(getattr(x0, 'shape', ()))}")
        if x0.shape[0] == 0:
            raise ValueError("no images to evaluate (N = 0)")
        if self.sample_shape is not None and tuple(x0.shape[1:]) != self.sample_shape:
            raise ValueError(f"the model takes images of shape (C, H, W) = {self.sample_shape}, got {tuple(x0.shape[1:])}")
        if not bool(torch.isfinite(x0).all()):
            raise ValueError(f"images must be finite, got {int((~torch.isfinite(x0)).sum())} NaN or infinite values")
        low, high = float(x0.min()), float(x0.max())
        if low < -1.0 or high > 1.0:
            raise ValueError(f"images must lie in [-1, 1] (8-bit data scaled as x/127.5 - 1), got values in "
                             f"[{low:.6g}, {high:.6g}]")
        x0 = x0.float()
        grid = torch.round((x0 + 1) * (LEVELS / 2)) / (LEVELS / 2) - 1
        quantised = int(((grid - x0).abs() > 1e-6).flatten(1).any(1).sum())
        return grid.contiguous(), quantised

    def _check_labels(self, labels, n: int) -> torch.Tensor | None:
        if self.num_classes is None:
            if labels is not None:
                raise ValueError("labels are for a class-conditional model; this model is unconditional")
            return None
        if labels is None:
            raise ValueError(f"a class-conditional model is evaluated given a label: pass labels= (0 … "
                             f"{self.num_classes - 1}, or {self.num_classes} for ∅, no label)")
        y = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        y = y.expand(n) if y.numel() == 1 else y
        if y.shape != (n,) or int(y.min()) < 0 or int(y.max()) > self.num_classes:
            raise ValueError(f"labels must be one int or {n} ints in [0, {self.num_classes}] ({self.num_classes} = ∅), "
                             f"got {labels!r}")
        return y.contiguous()


@contextlib.contextmanager
def _eval_mode(model):
    """model.eval() for the evaluation (dropout off), its flag restored afterwards."""
    training = isinstance(model, torch.nn.Module) and model.training
    if training:
        model.eval()
    try:
        yield
    finally:
        if training:
            model.train()
