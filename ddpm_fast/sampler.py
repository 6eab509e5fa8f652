"""Sampler: draws x_0 ~ p_θ by ancestral sampling (Algorithm 2), DDIM or DPM-Solver++(2M).

Each network evaluation is followed by one fused update (ops.diffusion_step_) whose
coefficient row, timestep and noise key come from a StepTable held on the device at a step
index held in device memory, so the loop never waits for the host; on CUDA the whole step
(model forward + update + index increment) is captured once in a CUDA graph and replayed.
DPM-Solver++ rows also read and write a history buffer (the previous x̂0) inside the same update.
Guidance (DESIGN §2.5) enters the same update: classifier-free guidance runs the network once on
the 2B batch (labels, then ∅) and the kernel combines the halves; classifier guidance passes the
gradient ∇ₓ log p_φ(y | x_t, t) of a classifier as one more input. A learned variance (DESIGN §2.3)
too: the network's 2C output channels are split into ε and the variance channels (views), which
the DDPM rows read.
Noise follows DESIGN §3: x_T is randn(step=T), the update at timestep i adds randn(step=i),
per global sample index — sample j is the same whatever batch, device or backend draws it.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from tqdm.auto import tqdm

from .contract import BACKENDS, LEARNED_VARIANCES, METHODS, MULTISTEP_METHODS, check_choice, check_samples
from .ops._dispatch import resolve
from .ops.diffusion_step import IMPLEMENTATIONS as STEP_IMPLEMENTATIONS
from .ops.noise import RANDN_IMPLEMENTATIONS
from .reference.diffusion_step import diffusion_step as reference_step
from .schedule import NoiseSchedule, StepTable
from .classifier import classifier_gradient
from .adm import ADMUNet
from .compiled import CompiledUNet
from .unet import UNet

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class Sampler:
    """Draw samples from a noise-prediction model.

    model: any callable (x [B, C, H, W], t [B] int64) → ε (or x_0 / v, see prediction_type);
    a diffusers UNet2DModel is accepted as is. An nn.Module runs in eval mode without autograd
    (its training flag is restored afterwards).

    dtype: None (the default) runs an nn.Module in its own dtype, that of its floating-point
    parameters, and leaves it as it is; another callable gets float32 inputs. An explicit dtype
    converts an nn.Module to it in place (model.to(dtype)), as the CLI's --dtype does. x stays
    float32 (float64 for a float64 model, which only backend="reference" samples: the fused
    kernels keep x in float32, and refuse a float64 model with an error that says so).

    method: "ddpm" (all T steps, or `steps` respaced), "ddim" (`steps`, `eta`, `spacing`), or
    DPM-Solver++(2M) "dpm-solver++" / its SDE variant "dpm-solver++-sde" (`steps`, default 20;
    `spacing` as diffusers' DPMSolverMultistepScheduler defines it, default "linspace", or
    "lambda"; `use_karras_sigmas`), whose rows also read and write a history buffer (DESIGN §2.4).
    backend: "auto" (Triton on CUDA, the C++ op on CPU), "reference", "cpu", "cuda", "triton".
    variance: "fixed_large" (σ_t² = β_t), "fixed_small" (β̃_t), or a variance the network learned
    (Nichol & Dhariwal 2021): the model then returns 2C channels, ε (or x_0 / v) and v, split as
    torch.split(out, C, dim=1); "learned_range" takes Σ_θ = exp(frac·log β_t + (1 − frac)·log β̃_t),
    frac = (v + 1)/2 (their eq. 15), "learned" Σ_θ = exp(v). DDPM rows (full or respaced: β_t and
    β̃_t of the respaced chain, as guided-diffusion's SpacedDiffusion) use it; DDIM and DPM-Solver++
    ignore it, as guided-diffusion and diffusers do (DESIGN §2.3).

    Guidance (DESIGN §2.5; sample() then takes labels): a class-conditional UNet (num_classes=K)
    is sampled with labels; guidance_scale w ≥ 0 (one for every step or one per step) is
    classifier-free guidance, ε̃ = (1 + w)·ε(x, y) − w·ε(x, ∅), the network running once per
    step on the 2B batch; classifier, any callable (x_t, t) → logits [B, K] such as a
    NoisyClassifier, with classifier_scale s (default 1) adds its gradient ∇ₓ log p(y | x_t, t) —
    on the mean for DDPM (μ + s·Σ·g), on ε for the other methods (ε − s·√(1−ᾱ_t)·g) — to a
    conditional or an unconditional model. Both can be combined. The classifier's backward pass
    runs eagerly each step: a sampler with a classifier does not capture CUDA graphs.
    cuda_graph: capture each step in a CUDA graph on CUDA (the fused backends).
    compile: run a ddpm_fast UNet through UNet.compiled() (torch.compile, our ops opaque; the
    first step compiles, shown on the progress bar). Off by default on every device: on the CPU
    it gains at most 13.7% and its 16.8–39.3 s compile outweighs that in every job benchmarked
    (DESIGN §5.5); on GPUs it is unmeasured.
    check_finite: after the last step, sample() reads once whether x is finite and raises
    FloatingPointError if not (a NaN or infinite model gives no silently black images).
    finite_check_every: if set to K, a device-side flag records the first step whose x is not
    finite and is read every K steps (one sync per K steps); sampling then stops with an error
    naming that step.
    """

    def __init__(self, model: Callable, schedule: NoiseSchedule, method: str = "ddpm",
                 variance: str = "fixed_large", clip_denoised: bool = True, backend: str = "auto",
                 dtype: torch.dtype | None = None, steps: int | None = None, eta: float = 0.0,
                 spacing: str | None = None, prediction_type: str = "epsilon", use_karras_sigmas: bool = False,
                 sample_shape: tuple[int, int, int] | None = None, cuda_graph: bool = True,
                 finite_check_every: int | None = None, check_finite: bool = True, compile: bool = False,
                 guidance_scale: float | list[float] = 0.0, classifier: Callable | None = None,
                 classifier_scale: float | None = None):
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        if isinstance(model, torch.nn.Module) and any(p.is_meta for p in model.parameters()):
            raise ValueError(f"the model ({type(model).__name__}) has parameters on the meta device, which hold no "
                             f"values: load its weights first (model.to_empty(device=...) and load_state_dict)")
        network = model.model if isinstance(model, CompiledUNet) else model
        self.num_classes = network.num_classes if isinstance(network, (UNet, ADMUNet)) else None
        scales = list(guidance_scale) if isinstance(guidance_scale, (list, tuple)) else [guidance_scale]
        guided = any(w != 0 for w in scales)  # else no unconditional half is run
        if guided and (self.num_classes is None or not network.null_label):
            raise ValueError(f"guidance_scale={guidance_scale!r} is classifier-free guidance, which needs a "
                             f"class-conditional UNet (num_classes=K, trained with label dropout); this model is "
                             f"{'unconditional' if self.num_classes is None else 'conditional without a no-label token'}"
                             f" (a classifier= guides it instead)")
        if classifier is not None and not callable(classifier):
            raise TypeError(f"classifier must be a callable (x_t, t) -> logits, got {type(classifier).__name__}")
        if classifier is None and classifier_scale is not None:
            raise ValueError(f"classifier_scale={classifier_scale!r} scales a classifier's gradient: pass classifier=")
        check_choice("method", method, METHODS)
        check_choice("backend", backend, BACKENDS)
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"dtype must be None (the model's own) or float32, float16, bfloat16 or float64, "
                             f"got {dtype}")
        model_dtype = dtype if dtype is not None else _own_dtype(model)
        if model_dtype == torch.float64 and backend != "reference":
            raise ValueError(f"a float64 model ({'dtype=float64' if dtype is not None else 'its parameters'}) "
                             f"samples on backend='reference' only, got backend={backend!r}: the fused kernels keep "
                             f"x in float32 (pass backend='reference', or dtype=torch.float32 to convert the model)")
        if finite_check_every is not None and (not isinstance(finite_check_every, int) or finite_check_every < 1):
            raise ValueError(f"finite_check_every must be a positive int or None, got {finite_check_every!r}")
        if not isinstance(use_karras_sigmas, bool):
            raise TypeError(f"use_karras_sigmas must be a bool, got {use_karras_sigmas!r}")
        self.classifier, self.classifier_free = classifier, guided
        self.classifier_scale = 1.0 if classifier_scale is None else classifier_scale
        self.table = schedule.step_table(method, variance, clip_denoised, prediction_type, steps, eta, spacing,
                                         karras=use_karras_sigmas, guidance_scale=guidance_scale,
                                         classifier_scale=0.0 if classifier is None else self.classifier_scale)
        # the network returns 2C channels (ε, then the variance channels) whatever the method
        self.learned_variance = variance in LEARNED_VARIANCES
        spacing = spacing if spacing is not None else "linspace" if method in MULTISTEP_METHODS else "uniform"
        self.model, self.schedule, self.method, self.backend = model, schedule, method, backend
        self.dtype, self.cuda_graph, self.finite_check_every = model_dtype, cuda_graph, finite_check_every
        self.check_finite = bool(check_finite)
        self.timesteps = self.table.timesteps.tolist()
        # what decides the samples besides the model, seed and batch (a sampling job's manifest)
        self.config = dict(method=method, steps=len(self.table), eta=float(eta), clip_denoised=bool(clip_denoised),
                           variance=variance, prediction_type=prediction_type, spacing=spacing,
                           karras=use_karras_sigmas,
                           guidance_scale=scales if isinstance(guidance_scale, (list, tuple)) else guidance_scale,
                           classifier_scale=None if classifier is None else self.classifier_scale,
                           timesteps=schedule.num_timesteps, dtype=str(model_dtype).removeprefix("torch."),
                           backend=backend)
        self._tables: dict[torch.device, StepTable] = {}
        self.sample_shape = tuple(sample_shape) if sample_shape is not None else _infer_sample_shape(model)
        if len(self.sample_shape) != 3 or any(not isinstance(n, int) or isinstance(n, bool) or n < 1
                                              for n in self.sample_shape):
            raise ValueError(f"sample_shape must be three positive ints (C, H, W), got {sample_shape!r}")
        channels, known = self.sample_shape[0] * (1 + self.learned_variance), _output_channels(model)
        if known is not None and known != channels:
            raise ValueError(f"variance={variance!r} needs a model with {channels} output channels for "
                             f"{self.sample_shape[0]} input channels{_VARIANCE_HALF * self.learned_variance}, "
                             f"but this one has {known}")
        if dtype is not None and isinstance(model, torch.nn.Module):
            model.to(dtype)
        if not isinstance(compile, bool):
            raise TypeError(f"compile must be a bool, got {compile!r}")
        if compile and not isinstance(model, (UNet, CompiledUNet)):
            raise ValueError(f"compile=True compiles a ddpm_fast UNet's forward (UNet.compiled()); got a "
                             f"{type(model).__name__}: pass it through torch.compile yourself")
        if compile and isinstance(model, UNet):
            self.model = model.compiled()
        self.compiled = isinstance(self.model, CompiledUNet)
        self._warm = not self.compiled  # a compiled forward compiles on its first call (shown on the bar)

    @property
    def device(self) -> torch.device:
        if isinstance(self.model, torch.nn.Module):
            for tensor in self.model.parameters():
                return tensor.device
        return torch.device("cpu")

    @property
    def resolved_backend(self) -> str:
        """The backend `backend` stands for on the model's device ("auto" resolved)."""
        return resolve("diffusion_step", self.backend, self.device, STEP_IMPLEMENTATIONS)

    @torch.inference_mode()
    def sample(self, num_samples: int, seed: int = 0, sample_offset: int = 0, progress: bool | tqdm = False,
               batch_size: int | None = None, labels: int | list[int] | torch.Tensor | None = None) -> torch.Tensor:
        """x_0 for global samples sample_offset .. sample_offset + num_samples − 1: float32
        [num_samples, C, H, W], in [−1, 1] when clip_denoised. batch_size splits the work
        without changing any sample's noise. progress: True for a progress bar of this call,
        or a bar of the caller's (anything with update(n)) to advance by one per step.
        labels: the class of each sample (one int for all, or num_samples of them), required by a
        class-conditional model or a classifier and refused otherwise; sample j drawn with label y
        is the same whatever batch draws it."""
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        labels = self._check_labels(labels, num_samples)
        batch_size = num_samples if batch_size is None else batch_size
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        check_samples(seed, sample_offset, num_samples)
        backend = self.resolved_backend
        starts = range(0, num_samples, batch_size)
        path = f"{backend}{' + compile' * self.compiled}"
        bar = (contextlib.nullcontext(progress) if hasattr(progress, "update") else
               tqdm(total=len(starts) * len(self.table), disable=not progress, unit="step",
                    desc=f"{self.method} [{path}], {num_samples} samples"))
        with self._eval_mode(), bar as bar:
            run = self._sample_reference if backend == "reference" else self._sample_fused
            x = torch.cat([run(min(batch_size, num_samples - start), seed, sample_offset + start, bar, backend,
                               None if labels is None else labels[start:start + batch_size])
                           for start in starts])
        if self.check_finite:
            bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())  # the one device read of the run
            if bad:
                raise FloatingPointError(
                    f"{bad} of {num_samples} samples hold NaN or infinite values after the last step: the model gives "
                    f"non-finite outputs (check its weights); finite_check_every=1 (ddpm-fast sample --check-finite) "
                    f"names the step where they first appear")
        return x

    def _check_labels(self, labels, num_samples: int) -> torch.Tensor | None:
        needed = self.num_classes is not None or self.classifier is not None
        if labels is None:
            if needed:
                uses = [what for what, used in (("a class-conditional model", self.num_classes is not None),
                                                ("classifier guidance", self.classifier is not None)) if used]
                raise ValueError(f"this sampler draws with {' and '.join(uses)}: pass labels= (one class for all "
                                 f"samples, or one per sample)")
            return None
        if not needed:
            raise ValueError("labels= given, but the model is unconditional and there is no classifier to guide it")
        if isinstance(labels, int) and not isinstance(labels, bool):
            labels = [labels] * num_samples
        labels = torch.as_tensor(labels).cpu()
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
            raise TypeError(f"labels must be integer classes, got {labels.dtype}")
        if labels.shape != (num_samples,):
            raise ValueError(f"labels must be one int or {num_samples} of them (one per sample), got shape "
                             f"{tuple(labels.shape)}")
        upper = self.num_classes
        if labels.numel() and (int(labels.min()) < 0 or (upper is not None and int(labels.max()) >= upper)):
            raise ValueError(f"labels must lie in [0, {upper if upper is not None else 'K'}), got "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        return labels.long()

    def _initial_noise(self, n: int, seed: int, sample_offset: int, backend: str) -> torch.Tensor:
        # x_T under key T (DESIGN §3), drawn by the compiled kernel where one runs on this device
        device = self.device
        draw = RANDN_IMPLEMENTATIONS[resolve("randn", "reference" if backend == "reference" else "auto", device,
                                             RANDN_IMPLEMENTATIONS)]
        return draw((n, *self.sample_shape), seed, self.schedule.num_timesteps, sample_offset, device)

    @torch.inference_mode()
    def trajectory(self, num_samples: int, seed: int = 0, sample_offset: int = 0, frames: int = 12,
                   labels: int | list[int] | torch.Tensor | None = None) -> torch.Tensor:
        """The paper's progressive generation (Fig. 6): the predicted x̂0 (clipped as the update
        clips it) at `frames` evenly spaced steps, the last being the final x_0. Runs the
        reference loop; returns float32 [frames, num_samples, C, H, W]."""
        if not isinstance(frames, int) or not 1 <= frames <= len(self.table):
            raise ValueError(f"frames must be an int in [1, {len(self.table)}], got {frames!r}")
        keep = {round(i * (len(self.table) - 1) / max(frames - 1, 1)) for i in range(frames)}
        shots: list[torch.Tensor] = []

        def record(index: int, x: torch.Tensor, out: torch.Tensor, uncond, grad) -> None:
            if index in keep:
                shots.append(self.table.x0_hat(index, x, out, uncond, grad).float())

        check_samples(seed, sample_offset, num_samples)
        labels = self._check_labels(labels, num_samples)
        with self._eval_mode(), tqdm(disable=True) as bar:
            self._sample_reference(num_samples, seed, sample_offset, bar, "reference", labels, on_step=record)
        return torch.stack(shots)

    def _sample_reference(self, n: int, seed: int, sample_offset: int, bar, backend: str,
                          labels: torch.Tensor | None = None, on_step: Callable | None = None) -> torch.Tensor:
        x = self._initial_noise(n, seed, sample_offset, backend).to(torch.float64 if self.dtype == torch.float64
                                                                    else torch.float32)
        first_bad = torch.full((1,), -1, dtype=torch.int64, device=x.device)
        history = torch.zeros_like(x) if self.table.multistep else None
        y = None if labels is None else self._model_labels(labels.to(x.device))
        rows = zip(self.table.coefs, self.table.timesteps.tolist(), self.table.noise_keys.tolist())
        for index, (row, t, key) in enumerate(rows):
            out, uncond, grad, var = self._outputs(x, torch.full((n,), t, dtype=torch.int64, device=x.device), y)
            if on_step is not None:
                on_step(index, x, out, uncond, grad)
            z = RANDN_IMPLEMENTATIONS["reference"](tuple(x.shape), seed, key, sample_offset, x.device)
            x = reference_step(x, out, row, z, history, uncond, grad, var)
            self._note_non_finite(x, first_bad, torch.tensor([index], device=x.device))
            bar.update(1)
            self._check_finite(index + 1, first_bad)
        return x

    def _sample_fused(self, n: int, seed: int, sample_offset: int, bar, backend: str,
                      labels: torch.Tensor | None = None) -> torch.Tensor:
        x, replay, first_bad = self._fused_steps(n, seed, sample_offset, backend, labels)
        for done in range(1, len(self.table) + 1):
            if not self._warm and hasattr(bar, "set_postfix_str"):
                bar.set_postfix_str("compiling the U-Net (once per process)…")
            replay()
            if not self._warm and hasattr(bar, "set_postfix_str"):
                bar.set_postfix_str("")
            self._warm = True
            bar.update(1)
            self._check_finite(done, first_bad)
        return x

    def stepper(self, num_samples: int, seed: int = 0, sample_offset: int = 0,
                labels: int | list[int] | torch.Tensor | None = None) -> tuple[torch.Tensor, Callable[[], None]]:
        """For benchmarks and custom loops: (x, step) where x is x_T and each step() applies the
        next row of the table to x in place, exactly as sample() does (a CUDA-graph replay where
        sample() would capture). Fused backends only; call it, and step(), in inference mode with
        the model in eval mode. At most len(table) steps: the kernel reads the row at a device-side
        index, so a further call is refused here rather than read past the table. labels as for sample()."""
        check_samples(seed, sample_offset, num_samples)
        labels = self._check_labels(labels, num_samples)
        backend = self.resolved_backend
        if backend == "reference":
            raise ValueError("stepper() runs the fused backends; the reference backend has no in-place step")
        x, replay, _ = self._fused_steps(num_samples, seed, sample_offset, backend, labels)
        remaining = [len(self.table)]

        def step() -> None:
            if remaining[0] == 0:
                raise IndexError(f"all {len(self.table)} steps of the table were taken")
            remaining[0] -= 1
            replay()
        return x, step

    def _fused_steps(self, n: int, seed: int, sample_offset: int, backend: str, labels: torch.Tensor | None = None):
        """x_T, the callable that advances it by one row, and the device-side non-finite flag."""
        table = self._device_table(self.device)
        x = self._initial_noise(n, seed, sample_offset, backend)
        update = STEP_IMPLEMENTATIONS[backend]  # unchecked: sample() and stepper() checked the arguments
        step_index = torch.zeros(1, dtype=torch.int64, device=x.device)
        first_bad = torch.full((1,), -1, dtype=torch.int64, device=x.device)
        history = torch.zeros_like(x) if table.multistep else None  # the previous x̂0 (DESIGN §2.4)
        y = None if labels is None else self._model_labels(labels.to(x.device))  # on the device before any capture

        def step() -> None:
            t = table.timesteps[step_index].expand(n)  # gathered on the device: no host round trip
            out, uncond, grad, var = self._outputs(x, t, y)
            update(x, out, table.coefs, table.noise_keys, step_index, seed, sample_offset, history, uncond, grad, var)
            self._note_non_finite(x, first_bad, step_index)
            step_index.add_(1)

        replay = step
        if x.device.type == "cuda" and self.cuda_graph and self.classifier is None:
            replay = _capture(step, [x, step_index, first_bad] + ([history] if history is not None else []))
        return x, replay, first_bad

    def _device_table(self, device: torch.device) -> StepTable:
        # uploaded once per device: later sample() calls start without a host-to-device copy
        if device not in self._tables:
            self._tables[device] = self.table.to(device)
        return self._tables[device]

    def _note_non_finite(self, x: torch.Tensor, first_bad: torch.Tensor, step_index: torch.Tensor) -> None:
        # device-side bookkeeping only: the row index of the first update that left x non-finite
        if self.finite_check_every is not None:
            bad = (first_bad < 0) & ~torch.isfinite(x).all()
            first_bad.copy_(torch.where(bad, step_index, first_bad))

    def _check_finite(self, done: int, first_bad: torch.Tensor) -> None:
        # reads the flag (one sync) every finite_check_every steps and after the last
        if self.finite_check_every is None or (done % self.finite_check_every and done != len(self.table)):
            return
        index = int(first_bad.item())
        if index >= 0:
            raise FloatingPointError(f"x stopped being finite after the update at timestep "
                                     f"{self.timesteps[index]} (step {index + 1} of {len(self.table)})")

    def _model_labels(self, labels: torch.Tensor) -> torch.Tensor:
        # the network's labels for a batch, built once: y, then ∅ (= K) for the unconditional half
        return torch.cat([labels, torch.full_like(labels, self.num_classes)]) if self.classifier_free else labels

    def _outputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None):
        """(out, uncond, grad, var) of one step, t being one timestep for every sample: the network
        output (conditional when labelled), the unconditional half under classifier-free guidance (one
        forward of the 2B batch, whose halves the update combines: views, no copy), the classifier's
        gradient and, with a learned variance read by the table, the variance channels of the
        (conditional) output (the second C of 2C, a view), each or None. y: _model_labels' (2B labels
        under classifier-free guidance)."""
        n, uncond, grad, var = x.shape[0], None, None, None
        if self.classifier_free:
            both = self._model_output(torch.cat([x, x]).to(self.dtype), t[:1].expand(2 * n), y)
        else:
            both = self._model_output(x.to(self.dtype), t, y if self.num_classes is not None else None)
        if self.learned_variance:  # as diffusers' DDPMScheduler.step splits it
            both, variances = torch.split(both, x.shape[1], dim=1)
            var = variances[:n] if self.table.learned else None
        out, uncond = (both[:n], both[n:]) if self.classifier_free else (both, None)
        if self.classifier is not None:
            grad = classifier_gradient(self.classifier, x, t, y[:n]).to(x.dtype)
        return out, uncond, grad, var

    def _model_output(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        out = self.model(x, t) if y is None else self.model(x, t, y)
        out = getattr(out, "sample", out)  # diffusers returns UNet2DOutput
        shape = (x.shape[0], x.shape[1] * (1 + self.learned_variance), *x.shape[2:])
        if not isinstance(out, torch.Tensor) or out.shape != shape:
            raise ValueError(f"the model must return a tensor of shape {shape}"
                             f"{_VARIANCE_HALF * self.learned_variance}, "
                             f"got {tuple(getattr(out, 'shape', ())) or type(out).__name__}")
        if not out.is_floating_point():
            raise TypeError(f"the model must return a floating-point tensor (its prediction), got {out.dtype}")
        return out

    @contextlib.contextmanager
    def _eval_mode(self):
        # each module's own flag is restored: a wrapper in train mode may hold modules in eval mode
        modules = [module for network in (self.model, self.classifier) if isinstance(network, torch.nn.Module)
                   for module in network.modules()]
        flags = [module.training for module in modules]
        for module in modules:
            module.training = False
        try:
            yield
        finally:
            for module, flag in zip(modules, flags):
                module.training = flag


def _capture(step: Callable[[], None], state: list[torch.Tensor]) -> Callable[[], None]:
    """Capture `step` in a CUDA graph and return its replay. Warm-up (allocator, cuDNN and
    Triton autotuning) runs on a side stream against copies of `state`, which is restored, so
    the captured tensors start where they were."""
    saved = [t.clone() for t in state]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    for t, s in zip(state, saved):
        t.copy_(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


_VARIANCE_HALF = " (its prediction, then the variance channels of a learned variance)"


def _output_channels(model) -> int | None:
    """The output channels a ddpm_fast UNet or a diffusers model declares (None: not known before a call)."""
    model = model.model if isinstance(model, CompiledUNet) else model
    if isinstance(model, UNet):
        return model.config["out_ch"]
    if isinstance(model, ADMUNet):
        return model.config["out_channels"]
    return getattr(getattr(model, "config", None), "out_channels", None)


def _infer_sample_shape(model) -> tuple[int, int, int]:
    model = model.model if isinstance(model, CompiledUNet) else model
    if isinstance(model, UNet):
        return (model.in_channels, model.resolution, model.resolution)
    if isinstance(model, ADMUNet):
        return (model.in_channels, model.config["image_size"], model.config["image_size"])
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "in_channels") and hasattr(config, "sample_size"):  # diffusers
        size = config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (config.in_channels, h, w)
    raise ValueError("cannot tell the sample shape from the model; pass sample_shape=(C, H, W)")


def _own_dtype(model) -> torch.dtype:
    """The dtype an nn.Module computes in (its first floating-point parameter's); float32 else."""
    if isinstance(model, torch.nn.Module):
        for tensor in model.parameters():
            if tensor.is_floating_point():
                return tensor.dtype
    return torch.float32
