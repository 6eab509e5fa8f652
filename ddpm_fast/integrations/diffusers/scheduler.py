"""FusedDDPMScheduler: diffusers' DDPMScheduler whose step() is ddpm_fast's fused update.

Same constructor, config, timesteps and step() signature as DDPMScheduler, so a pipeline takes
it unchanged (`accelerate(pipeline)` swaps it in). The maths differs only in precision: the
coefficients come from NoiseSchedule.step_table in float64 over the scheduler's own betas and
timesteps (diffusers keeps ᾱ in float32), and z follows ddpm_fast's noise contract (DESIGN §3)
instead of the generator's stream: keyed by (seed, sample_offset + batch index, timestep). The seed
(DESIGN §9): a step given a generator draws it from that generator (one int64, so the generator
advances as diffusers' own noise draw advances it: the same seeded generator gives the same
samples, the next call with it different ones); without one, `self.seed`, else one drawn from
torch's global generator when set_timesteps starts a run. A list of generators (one per sample)
is refused by a step that draws noise; the noise contract already gives every sample its own
stream.

pred_original_sample (x̂0 of the step's row, DESIGN §2.3) is formed when it is first read, from
the step's inputs, so a pipeline that reads only prev_sample pays nothing for it;
return_dict=False, and inputs made under torch.inference_mode (which keep no version counter to
tell whether they change before the read), form it at once.

float64 inputs are stepped in float64 (the reference update, DESIGN §2.3), every other dtype by
the fused op with x in float32. rescale_betas_zero_snr=True (ᾱ_T = 0) is supported with v- and
x0-prediction, whose coefficients stay finite; with ε-prediction x̂0 = (x − ε)/0 there, refused.

variance_type "learned_range" and "learned" (a model with 2C output channels) split the model
output as DDPMScheduler.step does (torch.split(model_output, C, dim=1)) and pass the second half to
the fused step as its variance channels (DESIGN §2.3). diffusers' "learned" is the variance itself
(σ = √v), not improved-diffusion's log-variance: its v is passed as log v, computed in float32
(float64 for float64 samples). diffusers floors β̃ at 1e-20 where improved-diffusion clips it, which
differs on the last row only, and only when that row draws noise (a last timestep above 0): the
run's last row takes log(1e-20), as diffusers does.

Saved (save_pretrained, or a pipeline's), it is a plain DDPMScheduler config: the folder loads
with diffusers alone, and accelerate() makes it fused again.
"""
from __future__ import annotations

import json
import math

import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput

from ...ops import diffusion_step_, randn
from ...reference.diffusion_step import diffusion_step as reference_step
from ...contract import STEP_COLUMNS
from ...schedule import NoiseSchedule, StepTable

# diffusers' names → ours; fixed_small_log is fixed_small (σ = exp(½·log β̃) = √β̃); diffusers'
# "learned" (the variance) becomes ours (the log-variance) by taking the log of its channels
_VARIANCES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large",
              "learned_range": "learned_range", "learned": "learned"}
_LEARNED = ("learned_range", "learned")
_LOG_BETA_TILDE = STEP_COLUMNS.index("log_beta_tilde")
VARIANCE_FLOOR = 1e-20  # diffusers' DDPMScheduler._get_variance clamps β̃ here before its log
_PREDICTIONS = {"epsilon": "epsilon", "sample": "x0", "v_prediction": "v"}


class FusedStep:
    """What both fused schedulers share: the noise seed of a run, the table on each device, and a
    saved config under the stock class's name. Mixed in before the diffusers class."""
    # Plain attributes rather than constructor arguments: diffusers builds schedulers from
    # configs through the parent's registered __init__ signature.
    seed: int | None = None  # fixed noise seed for every run; None: one per set_timesteps
    sample_offset: int = 0  # global index of the batch's first sample in the noise contract
    impl: str = "auto"  # ddpm_fast.ops.diffusion_step_'s backend
    _run_seed: int | None = None
    _on_device: dict[tuple[int, torch.device], StepTable] | None = None  # reset with the host tables

    def _new_run(self) -> None:
        self._on_device = {}
        self._run_seed = draw_seed(None)

    def _noise_seed(self, generator: torch.Generator | list[torch.Generator] | None, draws: bool = True) -> int:
        """The seed of this step's z (module doc). A step that draws no noise (draws=False) takes any
        generator argument, a list included, and leaves it as it is."""
        if not draws:
            return 0
        if isinstance(generator, list):
            raise NotImplementedError(f"{type(self).__name__}.step: one generator per sample is not supported where "
                                      f"the step draws noise; the noise contract already gives every sample its own "
                                      f"stream (pass one generator)")
        seed = draw_seed(generator) if generator is not None else (
            self.seed if self.seed is not None else self._run_seed)
        if seed is None:
            raise ValueError(f"{type(self).__name__}.step: no noise seed; pass a generator, set .seed or call "
                             f"set_timesteps")
        return seed

    def _device_table(self, host: StepTable, device: torch.device) -> StepTable:
        if self._on_device is None:  # stepping without set_timesteps: diffusers' full-chain default
            self._on_device = {}
        key = (id(host), device)  # the run's tables live until the next set_timesteps clears this
        if key not in self._on_device:
            self._on_device[key] = host.to(device)
        return self._on_device[key]

    def _apply(self, host: StepTable, index: int, model_output: torch.Tensor, sample: torch.Tensor, seed: int,
               history: torch.Tensor | None = None, variance: torch.Tensor | None = None) -> torch.Tensor:
        """x_prev for row `index` of the run's table: the fused op with x in float32 (a copy: diffusers'
        step does not update in place), or the reference update for float64 samples (DESIGN §2.3),
        with the same row and noise (and the variance channels of a learned variance)."""
        if sample.dtype == torch.float64:
            z = randn(tuple(sample.shape), seed=seed, step=int(host.noise_keys[index]),
                      sample_offset=self.sample_offset, device=sample.device)
            return reference_step(sample, model_output, host.coefs[index], z, history, variance_output=variance)
        x = sample.to(torch.float32, copy=True)
        table = self._device_table(host, sample.device)
        step_index = torch.tensor([index], dtype=torch.int64).to(sample.device, non_blocking=True)
        diffusion_step_(x, model_output, table.coefs, table.noise_keys, step_index, seed=seed,
                        sample_offset=self.sample_offset, history=history, variance_output=variance, impl=self.impl,
                        check=False)
        return x.to(sample.dtype)

    def _output(self, host: StepTable, index: int, model_output: torch.Tensor, sample: torch.Tensor,
                prev_sample: torch.Tensor, return_dict: bool):
        """diffusers' (prev_sample, pred_original_sample), x̂0 of row `index` formed when read."""
        def form() -> torch.Tensor:
            x = sample if sample.dtype == torch.float64 else sample.float()
            return host.x0_hat(index, x, model_output).to(sample.dtype)
        if not return_dict:
            return prev_sample, form()
        if model_output.is_inference() or sample.is_inference():
            # no version counter tells whether they change before a later read: formed now
            return self._output_class(prev_sample=prev_sample, pred_original_sample=form())
        return self._output_class.deferred(prev_sample, form, (model_output, sample))

    def to_json_string(self) -> str:
        """The config as the stock diffusers scheduler writes it, under that class's name: a saved
        scheduler (save_pretrained, or a pipeline's) loads without ddpm_fast."""
        config = json.loads(super().to_json_string())
        config["_class_name"] = self._stock.__name__
        return json.dumps(config, indent=2, sort_keys=True) + "\n"


def draw_seed(generator: torch.Generator | None) -> int:
    """One int64 in [0, 2^63) (a valid noise seed, DESIGN §3.2) from the generator, torch's global
    one when None; the generator advances. A CUDA generator's draw costs one device read."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.empty((), dtype=torch.int64, device=device).random_(generator=generator))


class DeferredX0:
    """Mixed into a diffusers step output (fields prev_sample, pred_original_sample): x̂0 is formed
    when first read (by attribute, key, index or to_tuple), so a pipeline that reads only
    prev_sample pays nothing for it. Built by `deferred`; constructed directly it is the plain output."""
    _form = None

    @classmethod
    def deferred(cls, prev_sample: torch.Tensor, form, inputs: tuple[torch.Tensor, ...]):
        """form() gives x̂0 from `inputs`, which must not change in place before it is read."""
        versions = tuple(x._version for x in inputs)

        def checked_form() -> torch.Tensor:
            if tuple(x._version for x in inputs) != versions:
                raise RuntimeError("pred_original_sample: the step's sample or model_output was modified in place "
                                   "after step(); read pred_original_sample first, or step with return_dict=False")
            return form()
        output = cls(prev_sample=prev_sample)
        object.__setattr__(output, "_form", checked_form)
        return output

    @property
    def pred_original_sample(self) -> torch.Tensor | None:
        if self._form is not None:
            form = self._form
            object.__setattr__(self, "_form", None)
            self["pred_original_sample"] = form()
        return self.get("pred_original_sample")

    @pred_original_sample.setter
    def pred_original_sample(self, value: torch.Tensor | None) -> None:  # BaseOutput keeps fields as keys too
        if value is not None:
            dict.__setitem__(self, "pred_original_sample", value)

    def __getitem__(self, key):
        self.pred_original_sample  # noqa: B018 (formed before any access by key or index)
        return super().__getitem__(key)

    def to_tuple(self) -> tuple:
        self.pred_original_sample  # noqa: B018
        return super().to_tuple()


class DDPMStepOutput(DeferredX0, DDPMSchedulerOutput):
    pass


def refuse(scheduler, problems: list[str]) -> None:
    if problems:
        raise NotImplementedError(f"{type(scheduler).__name__} does not support " + "; ".join(problems))


class FusedDDPMScheduler(FusedStep, DDPMScheduler):
    _stock = DDPMScheduler
    _output_class = DDPMStepOutput
    _host: tuple[StepTable, dict[int, int]] | None = None

    def set_timesteps(self, *args, **kwargs) -> None:
        super().set_timesteps(*args, **kwargs)
        self._host = None
        self._new_run()

    def problems(self) -> list[str]:
        """The options of this config the fused step does not cover (empty: all covered)."""
        config, problems = self.config, []
        if config.variance_type not in _VARIANCES:
            problems.append(f"variance_type={config.variance_type!r} (supported: {sorted(_VARIANCES)})")
        if config.prediction_type not in _PREDICTIONS:
            problems.append(f"prediction_type={config.prediction_type!r} (supported: {sorted(_PREDICTIONS)})")
        if config.thresholding:
            problems.append("thresholding=True")
        if config.clip_sample and config.clip_sample_range != 1.0:
            problems.append(f"clip_sample_range={config.clip_sample_range} (the fused step clips to [-1, 1])")
        if config.get("rescale_betas_zero_snr") and config.prediction_type == "epsilon":
            problems.append("rescale_betas_zero_snr=True with prediction_type='epsilon' (ᾱ_T = 0 makes "
                            "x̂0 = (x − √(1−ᾱ_T)·ε)/√ᾱ_T infinite; use 'v_prediction' or 'sample')")
        return problems

    def _rows(self) -> tuple[StepTable, dict[int, int]]:
        """The float64 table for this scheduler's β and timesteps (so custom schedules and
        spacings carry over), and timestep → row."""
        if self._host is None:
            config = self.config
            refuse(self, self.problems())
            table = NoiseSchedule(self.betas.double(), bool(config.get("rescale_betas_zero_snr"))).step_table(
                "ddpm", _VARIANCES[config.variance_type], bool(config.clip_sample), _PREDICTIONS[config.prediction_type],
                steps=self.timesteps.tolist())
            if config.variance_type in _LEARNED:  # the last row's β̃ = 0 floored, not clipped (module doc)
                table.coefs[-1, _LOG_BETA_TILDE] = math.log(VARIANCE_FLOOR)
            self._host = table, {t: i for i, t in enumerate(table.timesteps.tolist())}
        return self._host

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True):
        """diffusers' DDPMScheduler.step, run by ddpm_fast.ops.diffusion_step_ (noise: see module doc)."""
        model_output, variance = self._split(model_output, sample)
        host, rows = self._rows()
        seed = self._noise_seed(generator)
        t = int(timestep)
        if t not in rows:
            raise ValueError(f"FusedDDPMScheduler.step: timestep {t} is not one of this run's {len(rows)} timesteps "
                             f"({max(rows)} down to {min(rows)})")
        index = rows[t]
        if sample.dim() != 4:  # the op reads any layout of a 4-D tensor, other ranks contiguous
            sample, model_output = sample.contiguous(), model_output.contiguous()
            variance = None if variance is None else variance.contiguous()
        prev_sample = self._apply(host, index, model_output, sample, seed, variance=variance)
        return self._output(host, index, model_output, sample, prev_sample, return_dict)

    def _split(self, model_output: torch.Tensor, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the prediction, the variance channels or None), split as DDPMScheduler.step splits a learned
        variance's 2C channels; diffusers' "learned" channels (the variance) become their log."""
        variance_type = self.config.variance_type
        if variance_type not in _LEARNED:
            if model_output.shape != sample.shape:
                raise ValueError(f"FusedDDPMScheduler.step: model_output must have the sample's shape "
                                 f"{tuple(sample.shape)}, got {tuple(model_output.shape)}")
            return model_output, None
        if sample.dim() < 2 or model_output.shape != (sample.shape[0], 2 * sample.shape[1], *sample.shape[2:]):
            raise ValueError(f"FusedDDPMScheduler.step: variance_type={variance_type!r} needs a model_output of 2C "
                             f"channels (the prediction, then the variance) for a sample {tuple(sample.shape)}, got "
                             f"{tuple(model_output.shape)}")
        model_output, variance = torch.split(model_output, sample.shape[1], dim=1)
        if variance_type == "learned":  # diffusers' σ² = v, the op's log σ² = log v
            dtype = torch.float64 if sample.dtype == torch.float64 else torch.float32
            model_output, variance = model_output.to(dtype).contiguous(), variance.to(dtype).log().contiguous()
        return model_output, variance

