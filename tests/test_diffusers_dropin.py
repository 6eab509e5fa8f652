"""The diffusers drop-in's gaps: a saved accelerated pipeline reloads; float64 and
non-contiguous inputs; zero terminal SNR; diffusers' DDIM spacings by their names; generators
(a reused one advances, lists where nothing is drawn) and x̂0 formed only when read."""
import json

import numpy as np
import pytest
import torch

import ddpm_fast as df
from helpers import relative_error
from test_diffusers_accelerate import _contract_noise
from test_diffusers_parity import SMALL_CONFIG, _in_float64, _random_unet2d

diffusers = pytest.importorskip("diffusers")
from ddpm_fast.integrations.diffusers import (FusedDDPMScheduler, FusedDPMSolverMultistepScheduler,  # noqa: E402
                                              accelerate)
from ddpm_fast.integrations.diffusers.scheduler import draw_seed  # noqa: E402

scheduling_ddpm = pytest.importorskip("diffusers.schedulers.scheduling_ddpm")
pipeline_ddpm = pytest.importorskip("diffusers.pipelines.ddpm.pipeline_ddpm")


def test_a_saved_accelerated_pipeline_reloads_and_samples_identically(tmp_path):
    pipe = diffusers.DDPMPipeline(unet=_random_unet2d(SMALL_CONFIG, seed=2),
                                  scheduler=diffusers.DDPMScheduler(num_train_timesteps=1000))
    accelerate(pipe)
    pipe.set_progress_bar_config(disable=True)
    before = pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(3), output_type="np")
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["scheduler"] == ["diffusers", "DDPMScheduler"]
    assert json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "DDPMScheduler"
    loaded = diffusers.DDPMPipeline.from_pretrained(tmp_path)  # diffusers alone: a stock pipeline
    assert type(loaded.scheduler) is diffusers.DDPMScheduler
    assert accelerate(loaded)["scheduler"] == 1 and isinstance(loaded.scheduler, FusedDDPMScheduler)
    loaded.set_progress_bar_config(disable=True)
    after = loaded(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(3), output_type="np")
    assert (after.images == before.images).all()
    assert isinstance(FusedDDPMScheduler.from_pretrained(tmp_path / "scheduler"), FusedDDPMScheduler)


@pytest.mark.parametrize("shape,transpose", [((2, 3, 8, 8), False), ((4, 5, 6), True), ((6, 7), True)])
def test_float64_and_non_contiguous_inputs_step_like_diffusers(monkeypatch, shape, transpose):
    theirs = _in_float64(diffusers.DDPMScheduler(num_train_timesteps=1000))
    ours = FusedDDPMScheduler.from_config(theirs.config)
    ours.betas = theirs.betas  # the same float64 β on both sides
    _contract_noise(monkeypatch, seed=5, timestep_of_call=[500])
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)
    if transpose:
        x, out = x.transpose(0, -1), out.transpose(0, -1)
        assert not x.is_contiguous()
    expected = theirs.step(out, 500, x, generator=torch.Generator().manual_seed(5))
    got = ours.step(out, 500, x, generator=torch.Generator().manual_seed(5))
    assert got.prev_sample.dtype == torch.float64 and got.prev_sample.shape == x.shape
    # the noise is the contract's float32 draw on both sides; the rest is float64 arithmetic
    assert relative_error(got.prev_sample, expected.prev_sample) < 1e-12
    assert relative_error(got.pred_original_sample, expected.pred_original_sample) < 1e-12
    low = ours.step(out.float(), 500, x.float(), generator=torch.Generator().manual_seed(5)).prev_sample
    assert low.dtype == torch.float32 and relative_error(low, expected.prev_sample) < 1e-5


def _zero_snr_in_float64(scheduler):
    scheduler.betas = scheduling_ddpm.rescale_zero_terminal_snr(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    scheduler.alphas = 1.0 - scheduler.betas
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    return scheduler


def _beside_stock(theirs, steps, monkeypatch, seed):
    """FusedDDPMScheduler with the config and float64 β of `theirs`, both set to `steps` (None: the
    full chain), diffusers drawing the contract's noise under `seed`: (ours, its timesteps, current),
    current[0] the timestep whose noise diffusers draws next."""
    ours = FusedDDPMScheduler.from_config(theirs.config)
    ours.betas = theirs.betas
    for scheduler in (theirs, ours):
        if steps is not None:
            scheduler.set_timesteps(steps)
    current = [None]
    _contract_noise(monkeypatch, seed=seed, timestep_of_call=current)
    return ours, ours.timesteps.tolist(), current


@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("steps", [None, 10])
def test_zero_terminal_snr_steps_like_diffusers(monkeypatch, prediction, variance, steps):
    config = dict(num_train_timesteps=1000, rescale_betas_zero_snr=True, prediction_type=prediction,
                  variance_type=variance, timestep_spacing="trailing")
    theirs = _zero_snr_in_float64(diffusers.DDPMScheduler(**config))
    assert theirs.alphas_cumprod[-1] == 0
    ours, timesteps, current = _beside_stock(theirs, steps, monkeypatch, seed=11)
    assert timesteps[0] == 999  # the step from ᾱ_T = 0
    for index in sorted({0, 1, len(timesteps) // 2, len(timesteps) - 1}):
        current[0] = t = timesteps[index]
        g = torch.Generator().manual_seed(index)
        x, out = torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64), torch.randn(2, 3, 5, 5, generator=g,
                                                                                         dtype=torch.float64)
        expected = theirs.step(out, t, x, generator=torch.Generator().manual_seed(11))
        got64 = ours.step(out, t, x, generator=torch.Generator().manual_seed(11))
        got32 = ours.step(out.float(), t, x.float(), generator=torch.Generator().manual_seed(11))
        if variance == "fixed_small" and t == timesteps[-1] and t > 0:
            # diffusers clamps the variance to 1e-20 where it is 0 (ᾱ_prev = 1): σ = 1e-10 instead of 0
            seed = draw_seed(torch.Generator().manual_seed(11))  # the seed the steps drew
            got64.prev_sample += 1e-10 * df.randn(x.shape, seed=seed, step=t, impl="reference").double()
        assert relative_error(got64.prev_sample, expected.prev_sample) < 1e-12, t
        assert relative_error(got32.prev_sample, expected.prev_sample) < 1e-5, t
        assert relative_error(got32.pred_original_sample, expected.pred_original_sample) < 1e-5, t


def test_zero_terminal_snr_with_epsilon_is_refused_naming_the_option():
    ours = FusedDDPMScheduler(num_train_timesteps=1000, rescale_betas_zero_snr=True)
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(NotImplementedError, match="rescale_betas_zero_snr=True with prediction_type='epsilon'"):
        ours.step(x, 999, x)


def test_zero_terminal_snr_schedules_are_accepted_and_others_refused():
    betas = torch.linspace(0.1, 0.2, 5, dtype=torch.float64)
    zero_snr = torch.cat([betas, torch.ones(1, dtype=torch.float64)])  # β_T = 1: ᾱ_T = 0
    with pytest.raises(ValueError, match="β_T = 1 needs zero_terminal_snr=True"):
        df.NoiseSchedule(zero_snr)
    for bad in (torch.cat([torch.ones(1, dtype=torch.float64), betas]), torch.cat([betas, torch.tensor([1.5])])):
        with pytest.raises(ValueError, match=r"every beta must lie in \(0, 1\), the last in \(0, 1\]"):
            df.NoiseSchedule(bad, zero_terminal_snr=True)
    schedule = df.NoiseSchedule(zero_snr, zero_terminal_snr=True)
    with pytest.raises(ValueError, match=r"ᾱ = 0 at timestep 5 \(zero terminal SNR\): epsilon prediction"):
        schedule.step_table("ddpm", prediction_type="epsilon")
    assert torch.isfinite(schedule.step_table("ddpm", prediction_type="v").coefs).all()


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("T,steps", [(1000, 50), (1000, 7), (1000, 333), (999, 50), (37, 10), (10, 1), (10, 10)])
def test_diffusers_ddim_spacings_by_their_names(spacing, T, steps):
    theirs = diffusers.DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
    theirs.set_timesteps(steps)
    assert df.NoiseSchedule.linear(T).timesteps(steps, spacing) == theirs.timesteps.tolist()


def test_a_trailing_ddim_run_is_diffusers_step_for_step():
    # DDIM η = 0 is deterministic after x_T: both runs start from our x_T and must end together
    theirs = _in_float64(diffusers.DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing",
                                                 clip_sample=False, set_alpha_to_one=True))
    theirs.set_timesteps(20)

    def model(x, t):
        return 0.1 * x + 0.01 * t.to(x.dtype).view(-1, 1, 1, 1) / 1000
    sampler = df.Sampler(model, df.NoiseSchedule.linear(1000), method="ddim", steps=20, spacing="trailing",
                         clip_denoised=False, backend="reference", dtype=torch.float64, sample_shape=(1, 4, 4))
    ours = sampler.sample(2, seed=3)
    x = df.randn((2, 1, 4, 4), seed=3, step=1000, impl="reference").double()  # the reference sampler's x_T
    for t in theirs.timesteps:
        x = theirs.step(model(x, t.expand(2)), t, x, eta=0.0).prev_sample
    assert sampler.timesteps == theirs.timesteps.tolist()
    assert relative_error(ours, x) < 1e-12


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [None, 50])
def test_full_loops_equal_stock_diffusers_fed_our_noise(monkeypatch, prediction, steps):
    # diffusers' own full-loop tests (test_full_loop_no_noise / _with_v_prediction) compare sums
    # of its generator's noise; the same loops, stock DDPMScheduler fed the noise contract's z,
    # must end where FusedDDPMScheduler ends (DESIGN §6: 1e-4 against diffusers' float32 tables)
    config = dict(num_train_timesteps=1000, beta_schedule="linear", prediction_type=prediction)
    theirs, ours = diffusers.DDPMScheduler(**config), FusedDDPMScheduler(**config)
    for scheduler in (theirs, ours):
        scheduler.set_timesteps(steps or 1000)
    current = [None]
    _contract_noise(monkeypatch, seed=5, timestep_of_call=current)
    x0 = torch.arange(4 * 3 * 8 * 8, dtype=torch.float32).reshape(4, 3, 8, 8) / (4 * 3 * 8 * 8) * 2 - 1
    samples = []
    for scheduler in (theirs, ours):
        x = x0.clone()
        for t in scheduler.timesteps.tolist():
            current[0] = t
            out = x * t / (t + 1)  # diffusers' dummy model
            x = scheduler.step(out, t, x, generator=torch.Generator().manual_seed(5)).prev_sample
        samples.append(x)
    assert relative_error(samples[1], samples[0]) < 1e-4


def _accelerated_pipeline(scheduler):
    pipe = diffusers.DDPMPipeline(unet=_random_unet2d(SMALL_CONFIG, seed=2), scheduler=scheduler)
    assert accelerate(pipe)["scheduler"] == 1
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("scheduler", ["ddpm", "sde-dpmsolver++"])
def test_a_reused_generator_draws_new_noise_and_a_reseeded_one_the_same(monkeypatch, scheduler):
    # DESIGN §9: each step draws its seed from the generator, so one generator reused for a second
    # batch gives new noise, and the same seeded generator the same samples. x_T is held fixed,
    # so the images differ only through the steps' noise.
    stock = diffusers.DDPMScheduler(num_train_timesteps=1000) if scheduler == "ddpm" else (
        diffusers.DPMSolverMultistepScheduler(algorithm_type=scheduler))
    pipe = _accelerated_pipeline(stock)
    x_T = df.randn((2, 1, 16, 16), seed=0, step=1000)
    monkeypatch.setattr(pipeline_ddpm, "randn_tensor", lambda shape, generator=None, device=None, dtype=None: x_T)

    def images(generator):
        return pipe(batch_size=2, num_inference_steps=5, generator=generator, output_type="np").images
    generator = torch.Generator().manual_seed(0)
    first, second = images(generator), images(generator)
    assert (images(torch.Generator().manual_seed(0)) == first).all()
    # measured: 0.447 (DDPM), 0.0894 (SDE); exactly 0 when the seed was generator.initial_seed()
    assert np.abs(second - first).mean() > 0.01


def test_pred_original_sample_is_returned_when_read_and_formed_only_then(monkeypatch):
    # diffusers' step returns x̂0; an accelerated pipeline, which reads only prev_sample, must not form it
    pipe = _accelerated_pipeline(diffusers.DDPMScheduler(num_train_timesteps=1000))
    formed = []
    x0_hat = df.schedule.StepTable.x0_hat
    monkeypatch.setattr(df.schedule.StepTable, "x0_hat", lambda *a, **k: formed.append(1) or x0_hat(*a, **k))
    pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
    assert formed == []
    theirs = diffusers.DDPMScheduler(num_train_timesteps=1000)
    for scheduler in (theirs, pipe.scheduler):
        scheduler.set_timesteps(10)
    g = torch.Generator().manual_seed(1)
    x, out = torch.randn(2, 1, 4, 4, generator=g), torch.randn(2, 1, 4, 4, generator=g)
    expected = theirs.step(out, 900, x).pred_original_sample
    step = pipe.scheduler.step(out, 900, x)
    assert formed == [] and list(step.keys()) == ["prev_sample"]
    assert relative_error(step.pred_original_sample, expected) < 1e-5 and formed == [1]
    assert step["pred_original_sample"] is step[1] is step.to_tuple()[1] is step.pred_original_sample
    for read in (lambda s: s[1], lambda s: s["pred_original_sample"], lambda s: s.to_tuple()[1]):
        assert relative_error(read(pipe.scheduler.step(out, 900, x)), expected) < 1e-5
    assert relative_error(pipe.scheduler.step(out, 900, x, return_dict=False)[1], expected) < 1e-5
    step = pipe.scheduler.step(out, 900, x)
    x.add_(1)  # the inputs x̂0 is formed from changed: refused, never a wrong x̂0
    with pytest.raises(RuntimeError, match="modified in place after step"):
        step.pred_original_sample
    with torch.inference_mode():  # inference tensors keep no version counter: x̂0 is formed at once
        x, out = x.clone() - 1, out.clone()
        step = pipe.scheduler.step(out, 900, x)
        x.add_(1)
    assert relative_error(step.pred_original_sample, expected) < 1e-5


def test_generator_lists_are_taken_where_no_noise_is_drawn():
    # deterministic DPM-Solver++ draws nothing: a list of generators (diffusers' one per sample) is
    # taken and the run is the one without; the steps that draw noise refuse it, naming why
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    runs = []
    for generator in (None, generators):
        ours = FusedDPMSolverMultistepScheduler(num_train_timesteps=1000)
        ours.set_timesteps(4)
        y = x
        for t in ours.timesteps:
            y = ours.step(0.1 * y, t, y, generator=generator).prev_sample
        runs.append(y)
    assert torch.equal(runs[0], runs[1])
    pipe = _accelerated_pipeline(diffusers.DPMSolverMultistepScheduler())
    assert pipe(batch_size=2, num_inference_steps=3, generator=generators, output_type="np").images.shape == (2, 16, 16, 1)
    for noisy in (FusedDPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"), FusedDDPMScheduler()):
        noisy.set_timesteps(4)
        with pytest.raises(NotImplementedError, match="one generator per sample is not supported where the step draws"):
            noisy.step(x, noisy.timesteps[0], x, generator=generators)


@pytest.mark.parametrize("variance", ["learned_range", "learned"])
@pytest.mark.parametrize("steps,offset", [(None, 0), (10, 0), (10, 1)])
def test_learned_variances_step_like_diffusers(monkeypatch, variance, steps, offset):
    # the 2C-channel output split as DDPMScheduler.step splits it; diffusers' "learned" is the variance
    # itself. steps_offset 1 ends the run at timestep 1, whose step draws noise with diffusers' floored β̃.
    theirs = _in_float64(diffusers.DDPMScheduler(num_train_timesteps=1000, variance_type=variance,
                                                 steps_offset=offset))
    ours, timesteps, current = _beside_stock(theirs, steps, monkeypatch, seed=7)
    assert not ours.problems()
    assert timesteps[-1] == (offset if steps else 0)
    for index in sorted({0, 1, len(timesteps) // 2, len(timesteps) - 1}):
        current[0] = t = timesteps[index]
        g = torch.Generator().manual_seed(index)
        x, eps = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 5, 4, generator=g)
        v = torch.rand(2, 3, 5, 4, generator=g) * 2 - 1 if variance == "learned_range" else \
            torch.rand(2, 3, 5, 4, generator=g) * 0.02 + 1e-4  # diffusers' learned: the variance, > 0
        both = torch.cat([eps, v], dim=1).double()
        expected = theirs.step(both, t, x, generator=torch.Generator().manual_seed(7))
        got = ours.step(both, t, x, generator=torch.Generator().manual_seed(7))
        assert relative_error(got.prev_sample, expected.prev_sample) < 1e-12, t
        assert relative_error(got.pred_original_sample, expected.pred_original_sample) < 1e-12, t
        for dtype, bound in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
            low = ours.step(both.to(dtype), t, x.to(dtype), generator=torch.Generator().manual_seed(7)).prev_sample
            assert low.dtype == dtype and relative_error(low, expected.prev_sample) < bound, (t, dtype)


def test_learned_variance_output_must_have_2c_channels():
    ours = FusedDDPMScheduler(num_train_timesteps=1000, variance_type="learned_range")
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"needs a model_output of 2C channels .* \(2, 3, 4, 4\), got \(2, 3, 4, 4\)"):
        ours.step(torch.randn(2, 3, 4, 4), 10, x)
    plain = FusedDDPMScheduler(num_train_timesteps=1000)
    with pytest.raises(ValueError, match="must have the sample's shape"):
        plain.step(torch.randn(2, 6, 4, 4), 10, x)
    pipe = diffusers.DDPMPipeline(unet=_random_unet2d({**SMALL_CONFIG, "out_channels": 2}, seed=2),
                                  scheduler=diffusers.DDPMScheduler(num_train_timesteps=1000,
                                                                    variance_type="learned_range"))
    assert accelerate(pipe)["scheduler"] == 1 and isinstance(pipe.scheduler, FusedDDPMScheduler)
