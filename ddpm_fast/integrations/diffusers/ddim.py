"""FusedDDIMScheduler: diffusers' DDIMScheduler whose step() is ddpm_fast's fused update (DESIGN
§2.3's DDIM row: x̂0, its clip, the step to the previous timestep and η's noise in one kernel).

Same constructor, config, set_timesteps and step() as DDIMScheduler: η, every timestep_spacing
and steps_offset (the stock set_timesteps' timesteps), clip_sample, set_alpha_to_one, ε-, x0-
("sample") and v-prediction, use_clipped_model_output, thresholding with sample_max_value = 1
(which is clipping x̂0 to [−1, 1]), rescale_betas_zero_snr with v- and x0-prediction. Each row is
diffusers' step from t to t − T // num_inference_steps (ᾱ of the final step 1, or ᾱ_0 when
set_alpha_to_one=False), in float64 from the scheduler's betas (diffusers keeps ᾱ in float32),
so any timestep in [0, T) steps as in diffusers. Refused by name: other prediction types,
thresholding with sample_max_value ≠ 1, clip_sample_range ≠ 1, ε-prediction with zero terminal
SNR, η outside [0, 1], variance_noise with η > 0. η > 0 draws z from ddpm_fast's noise contract
as FusedDDPMScheduler does (scheduler.py's module doc: the seed from the step's generator); η = 0
draws nothing and takes any generator argument, a list of generators included.
"""
from __future__ import annotations

import torch
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

from ...schedule import NoiseSchedule, StepTable, ddim_coefs, output_coefs, unguided_table
from .scheduler import _PREDICTIONS, DeferredX0, FusedStep, refuse


class DDIMStepOutput(DeferredX0, DDIMSchedulerOutput):
    pass


class FusedDDIMScheduler(FusedStep, DDIMScheduler):
    _stock = DDIMScheduler
    _output_class = DDIMStepOutput
    # (η, ε from the clipped x̂0) → the run's table and timestep → row; timesteps outside the run
    # (diffusers' step takes any) get one-row tables under (η, clipped, t). Reset by set_timesteps.
    _tables: dict[tuple, tuple[StepTable, dict[int, int]]] | None = None

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        super().set_timesteps(num_inference_steps, device)
        self._tables = {}
        self._new_run()

    def problems(self) -> list[str]:
        """The options of this config the fused step does not cover (empty: all covered)."""
        config, problems = self.config, []
        if config.prediction_type not in _PREDICTIONS:
            problems.append(f"prediction_type={config.prediction_type!r} (supported: {sorted(_PREDICTIONS)})")
        if config.thresholding and config.sample_max_value != 1.0:
            problems.append(f"thresholding with sample_max_value={config.sample_max_value} (only 1.0, which is "
                            f"clipping x̂0 to [-1, 1])")
        elif not config.thresholding and config.clip_sample and config.clip_sample_range != 1.0:
            problems.append(f"clip_sample_range={config.clip_sample_range} (the fused step clips to [-1, 1])")
        if config.rescale_betas_zero_snr and config.prediction_type == "epsilon":
            problems.append("rescale_betas_zero_snr=True with prediction_type='epsilon' (ᾱ_T = 0 makes "
                            "x̂0 = (x − √(1−ᾱ_T)·ε)/√ᾱ_T infinite; use 'v_prediction' or 'sample')")
        return problems

    def _rows(self, timesteps: list[int], eta: float, clipped_eps: bool) -> tuple[StepTable, dict[int, int]]:
        """diffusers' DDIM step at each timestep t, towards t − T // num_inference_steps, in float64."""
        config = self.config
        refuse(self, self.problems())
        ab = NoiseSchedule(self.betas.double(), bool(config.rescale_betas_zero_snr)).alphas_cumprod.tolist()
        final = 1.0 if config.set_alpha_to_one else ab[0]
        stride = config.num_train_timesteps // self.num_inference_steps
        clip = bool(config.clip_sample or config.thresholding)
        prediction = _PREDICTIONS[config.prediction_type]
        rows = []
        for t in timesteps:
            ab_s = ab[t - stride] if t >= stride else final
            A, B, Fx, Fo = output_coefs(ab[t], prediction, t)
            C, D, E, sigma = ddim_coefs(ab[t], ab_s, eta, Fx, Fo, clipped_eps and clip)
            rows.append((A, B, C, D, E, sigma, float(clip), 0.0))
        return unguided_table(rows, timesteps), {t: i for i, t in enumerate(timesteps)}

    def _row(self, t: int, eta: float, clipped_eps: bool) -> tuple[StepTable, int]:
        if self._tables is None:  # num_inference_steps set by hand, without set_timesteps
            self._tables = {}
        run = (eta, clipped_eps)
        if run not in self._tables:
            self._tables[run] = self._rows(self.timesteps.tolist(), eta, clipped_eps)
        table, rows = self._tables[run]
        if t in rows:
            return table, rows[t]
        if (*run, t) not in self._tables:
            self._tables[(*run, t)] = self._rows([t], eta, clipped_eps)
        return self._tables[(*run, t)][0], 0

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator: torch.Generator | None = None,
             variance_noise: torch.Tensor | None = None, return_dict: bool = True):
        """diffusers' DDIMScheduler.step, run by ddpm_fast.ops.diffusion_step_ (noise: see module doc)."""
        name = f"{type(self).__name__}.step"
        if self.num_inference_steps is None:
            raise ValueError(f"{name}: number of inference steps is None; call set_timesteps first")
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
            raise ValueError(f"{name}: eta must be a number in [0, 1], got {eta!r}")
        if variance_noise is not None and eta > 0:
            raise NotImplementedError(f"{name}: variance_noise is not supported; the fused step draws z in the "
                                      f"kernel from the noise contract (pass a generator, or set .seed)")
        if model_output.shape != sample.shape:
            raise ValueError(f"{name}: model_output must have the sample's shape {tuple(sample.shape)}, got "
                             f"{tuple(model_output.shape)}")
        t = int(timestep)
        if not 0 <= t < self.config.num_train_timesteps:
            raise ValueError(f"{name}: timestep must lie in [0, {self.config.num_train_timesteps}), got {t}")
        seed = self._noise_seed(generator, draws=eta > 0)
        host, index = self._row(t, float(eta), bool(use_clipped_model_output))
        if sample.dim() != 4:  # the op reads any layout of a 4-D tensor, other ranks contiguous
            sample, model_output = sample.contiguous(), model_output.contiguous()
        return self._output(host, index, model_output, sample, self._apply(host, index, model_output, sample, seed),
                            return_dict)
