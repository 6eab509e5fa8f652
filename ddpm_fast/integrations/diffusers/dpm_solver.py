"""FusedDPMSolverMultistepScheduler: diffusers' DPMSolverMultistepScheduler whose step() is
ddpm_fast's fused update (DESIGN §2.4): the data prediction, the second-order combination with
the previous one and the SDE variant's noise in one kernel, the previous x̂0 kept in a history
buffer that the kernel reads and rewrites.

Same constructor, config, set_timesteps and step() as the stock scheduler for algorithm_type
"dpmsolver++" / "sde-dpmsolver++", solver_order 1 or 2, the midpoint solver, ε-, x0- and
v-prediction, thresholding with sample_max_value = 1 (which is clipping x̂0 to [−1, 1]), the
linspace / leading / trailing spacings, Karras sigmas and λ-uniform steps (use_lu_lambdas), final
σ "zero" or "sigma_min"; everything else is refused by name. The rows are built in float64 from
the scheduler's betas (diffusers keeps its tables in float32), and set_timesteps keeps those
float64 timesteps (with Karras or λ-uniform steps a rounded timestep can differ by one from
diffusers' float32 ones). The SDE variant's z follows ddpm_fast's noise contract, as for
FusedDDPMScheduler (scheduler.py's module doc: keyed by (seed, sample_offset + batch index,
timestep), the seed drawn from the step's generator); the ODE variant draws nothing, so it takes
any generator argument, a list of generators included.
"""
from __future__ import annotations

import math

import torch
from diffusers import DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from ...schedule import NoiseSchedule, StepTable
from .scheduler import _PREDICTIONS, FusedStep, refuse


class FusedDPMSolverMultistepScheduler(FusedStep, DPMSolverMultistepScheduler):
    _stock = DPMSolverMultistepScheduler
    _host: StepTable | None = None
    _first_order: StepTable | None = None  # the same run at order 1: a run's first step has no history
    _history: torch.Tensor | None = None  # the previous step's x̂0, float32 in the sample's layout

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      mu: float | None = None, timesteps: list[int] | None = None) -> None:
        if timesteps is not None or mu is not None:
            raise NotImplementedError(f"{type(self).__name__}.set_timesteps takes num_inference_steps (custom "
                                      f"timesteps and mu are not supported)")
        self._host = self._table(num_inference_steps)
        self._first_order = self._table(num_inference_steps, order=1)
        super().set_timesteps(num_inference_steps, device=device)
        self.timesteps = self._host.timesteps.to(device=device)
        self._history = None
        self._new_run()

    def problems(self) -> list[str]:
        """The options of this config the fused step does not cover (empty: all covered)."""
        config, problems = self.config, []
        for name, supported in (("algorithm_type", ("dpmsolver++", "sde-dpmsolver++")), ("solver_order", (1, 2)),
                                ("solver_type", ("midpoint",)), ("prediction_type", tuple(_PREDICTIONS)),
                                ("final_sigmas_type", ("zero", "sigma_min")), ("variance_type", (None,)),
                                ("steps_offset", (0,))):
            if config[name] not in supported:
                problems.append(f"{name}={config[name]!r} (supported: {', '.join(map(repr, supported))})")
        for flag in ("euler_at_final", "use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas",
                     "rescale_betas_zero_snr", "use_dynamic_shifting"):
            if config.get(flag):
                problems.append(f"{flag}=True")
        if config.thresholding and config.sample_max_value != 1.0:
            problems.append(f"thresholding with sample_max_value={config.sample_max_value} (only 1.0, which is "
                            f"clipping x̂0 to [-1, 1])")
        if config.lambda_min_clipped != -math.inf:
            problems.append(f"lambda_min_clipped={config.lambda_min_clipped}")
        return problems

    def _table(self, steps: int, order: int | None = None) -> StepTable:
        config = self.config
        refuse(self, self.problems())
        spacing = "lambda" if config.use_lu_lambdas and not config.use_karras_sigmas else (
            "linspace" if config.use_karras_sigmas else config.timestep_spacing)
        return NoiseSchedule(self.betas.double()).step_table(
            "dpm-solver++-sde" if config.algorithm_type == "sde-dpmsolver++" else "dpm-solver++",
            clip_denoised=bool(config.thresholding), prediction_type=_PREDICTIONS[config.prediction_type],
            steps=steps, spacing=spacing, order=order or config.solver_order, karras=bool(config.use_karras_sigmas),
            final_sigma=config.final_sigmas_type, lower_order_final=bool(config.lower_order_final))

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None, variance_noise: torch.Tensor | None = None,
             return_dict: bool = True):
        """diffusers' DPMSolverMultistepScheduler.step, run by ddpm_fast.ops.diffusion_step_."""
        name = f"{type(self).__name__}.step"
        if self._host is None:
            raise ValueError(f"{name}: call set_timesteps first")
        if variance_noise is not None:
            raise NotImplementedError(f"{name}: variance_noise is not supported; the fused step draws z in the "
                                      f"kernel from the noise contract (pass a generator, or set .seed)")
        if model_output.shape != sample.shape:
            raise ValueError(f"{name}: model_output must have the sample's shape {tuple(sample.shape)}, got "
                             f"{tuple(model_output.shape)}")
        # the ODE variant draws no noise: any generator argument, a list of them included, is accepted
        seed = self._noise_seed(generator, draws=self.config.algorithm_type == "sde-dpmsolver++")
        if self.step_index is None:
            self._init_step_index(timestep)
        index = self.step_index
        if index >= len(self._host):
            raise IndexError(f"{name}: all {len(self._host)} steps of this run were taken; call set_timesteps")
        if sample.dim() != 4:  # the op reads any layout of a 4-D tensor, other ranks contiguous
            sample, model_output = sample.contiguous(), model_output.contiguous()
        dtype = torch.float64 if sample.dtype == torch.float64 else torch.float32
        # as diffusers' lower_order_nums: the first step a run takes (row 0, or a later row when a
        # pipeline starts part-way, e.g. img2img) is first order, having no previous x̂0
        first = self.lower_order_nums == 0 or self._history is None or self._history.shape != sample.shape
        if first:
            self._history = torch.zeros_like(sample, dtype=dtype)  # x's strides, as the op requires
        table = self._first_order if first else self._host
        prev_sample = self._apply(table, index, model_output, sample, seed, self._history)
        self._step_index += 1
        self.lower_order_nums = min(self.lower_order_nums + 1, self.config.solver_order)
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)
