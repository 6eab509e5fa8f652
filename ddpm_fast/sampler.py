"""Sampler: draws x_0 ~ p_θ by ancestral sampling (Algorithm 2) or DDIM.

Noise comes from the stream of DESIGN §3: x_T is randn(step=T) and the update at timestep i
adds randn(step=i), per global sample index, so sample j is the same whatever batch, device
or backend draws it.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from tqdm.auto import tqdm

from .ops import randn
from .reference import diffusion
from .schedule import NoiseSchedule
from .unet import UNet

METHODS = ("ddpm", "ddim")
BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")


class Sampler:
    """Draw samples from a noise-prediction model.

    model: any callable (x [B, C, H, W], t [B] int64) → ε (or x_0 / v, see prediction_type);
    a diffusers UNet2DModel is accepted as is. An nn.Module is cast to `dtype` and run in
    eval mode without autograd (its training flag is restored afterwards).
    """

    def __init__(self, model: Callable, schedule: NoiseSchedule, method: str = "ddpm",
                 variance: str = "fixed_large", clip_denoised: bool = True, backend: str = "auto",
                 dtype: torch.dtype = torch.float32, steps: int | None = None, eta: float = 0.0,
                 spacing: str = "uniform", prediction_type: str = "epsilon",
                 sample_shape: tuple[int, int, int] | None = None):
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if variance not in diffusion.VARIANCES:
            raise ValueError(f"variance must be one of {diffusion.VARIANCES}, got {variance!r}")
        if prediction_type not in diffusion.PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {diffusion.PREDICTION_TYPES}, got {prediction_type!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend not in ("auto", "reference"):
            raise NotImplementedError(f"backend={backend!r} runs the fused diffusion_step op, which is not "
                                      "built yet; use backend='reference' (or 'auto')")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise ValueError(f"dtype must be float32, float16, bfloat16 or float64, got {dtype}")
        if method == "ddpm" and steps not in (None, schedule.num_timesteps):
            raise ValueError(f"method='ddpm' runs all T={schedule.num_timesteps} steps; for steps={steps} use method='ddim'")
        if not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
        if method == "ddpm" and eta != 0.0:
            raise ValueError("eta applies to method='ddim' only")
        self.model, self.schedule, self.method = model, schedule, method
        self.variance, self.clip_denoised, self.backend = variance, clip_denoised, "reference"
        self.dtype, self.eta, self.prediction_type = dtype, float(eta), prediction_type
        self.timesteps = schedule.timesteps(steps, spacing)
        self.sample_shape = tuple(sample_shape) if sample_shape is not None else _infer_sample_shape(model)
        if isinstance(model, torch.nn.Module):
            model.to(dtype)

    @property
    def device(self) -> torch.device:
        if isinstance(self.model, torch.nn.Module):
            for tensor in self.model.parameters():
                return tensor.device
        return torch.device("cpu")

    @torch.inference_mode()
    def sample(self, num_samples: int, seed: int = 0, sample_offset: int = 0, progress: bool = False,
               batch_size: int | None = None) -> torch.Tensor:
        """x_0 for global samples sample_offset .. sample_offset + num_samples − 1: float32
        [num_samples, C, H, W] (float64 when dtype=float64), in [−1, 1] when clip_denoised.
        batch_size splits the work without changing any sample."""
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        batch_size = num_samples if batch_size is None else batch_size
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        with self._eval_mode():
            starts = range(0, num_samples, batch_size)
            bar = tqdm(total=len(starts) * len(self.timesteps), disable=not progress, unit="step",
                       desc=f"{self.method}, {num_samples} samples in {len(starts)} batch(es)")
            chunks = [self._sample_batch(min(batch_size, num_samples - start), seed, sample_offset + start, bar)
                      for start in starts]
            bar.close()
        return torch.cat(chunks)

    def _sample_batch(self, n: int, seed: int, sample_offset: int, bar) -> torch.Tensor:
        device, x_dtype = self.device, torch.float64 if self.dtype == torch.float64 else torch.float32
        T = self.schedule.num_timesteps
        x = randn((n, *self.sample_shape), seed=seed, step=T, sample_offset=sample_offset,
                  device=device, impl="reference").to(x_dtype)
        for index, i in enumerate(self.timesteps):
            t = torch.full((n,), i, dtype=torch.int64, device=device)
            out = self._model_output(x.to(self.dtype), t).to(x_dtype)
            noise = None if i == 0 or (self.method == "ddim" and self.eta == 0.0) else randn(
                x.shape, seed=seed, step=i, sample_offset=sample_offset, device=device, impl="reference").to(x_dtype)
            if self.method == "ddpm":
                x = diffusion.p_sample(self.schedule, out, x, t, noise, self.clip_denoised, self.variance,
                                       self.prediction_type)
            else:
                t_prev = torch.full_like(t, self.timesteps[index + 1] if index + 1 < len(self.timesteps) else -1)
                x = diffusion.ddim_step(self.schedule, out, x, t, t_prev, noise, self.eta, self.clip_denoised,
                                        self.prediction_type)
            bar.update(1)
        return x

    def _model_output(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.model(x, t)
        out = getattr(out, "sample", out)  # diffusers returns UNet2DOutput
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            raise ValueError(f"the model must return a tensor of the input's shape {tuple(x.shape)}, "
                             f"got {getattr(out, 'shape', type(out).__name__)}")
        return out

    @contextlib.contextmanager
    def _eval_mode(self):
        module = self.model if isinstance(self.model, torch.nn.Module) else None
        was_training = module is not None and module.training
        if module is not None:
            module.eval()
        try:
            yield
        finally:
            if was_training:
                module.train()


def _infer_sample_shape(model) -> tuple[int, int, int]:
    if isinstance(model, UNet):
        return (model.in_channels, model.resolution, model.resolution)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "in_channels") and hasattr(config, "sample_size"):  # diffusers
        size = config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (config.in_channels, h, w)
    raise ValueError("cannot tell the sample shape from the model; pass sample_shape=(C, H, W)")
