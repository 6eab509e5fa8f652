"""FusedDDIMScheduler against diffusers' DDIMScheduler (DESIGN §9): its step for the same model
output and noise over η, spacings, steps_offset, set_alpha_to_one, clipping and prediction types;
accelerate() on a DDIMPipeline; what it refuses, by name."""
import numpy as np
import pytest
import torch

from helpers import relative_error
from test_diffusers_accelerate import _contract_noise
from test_diffusers_parity import SMALL_CONFIG, _random_unet2d

diffusers = pytest.importorskip("diffusers")
from ddpm_fast.integrations.diffusers import FusedDDIMScheduler, accelerate  # noqa: E402

scheduling_ddim = pytest.importorskip("diffusers.schedulers.scheduling_ddim")

CLIPS = {"none": dict(clip_sample=False), "clip": dict(clip_sample=True),
         "threshold": dict(clip_sample=False, thresholding=True, sample_max_value=1.0)}


def _in_float64(scheduler):
    # diffusers keeps ᾱ in float32; its formulas in float64 must give ours to rounding
    config = scheduler.config
    scheduler.betas = torch.linspace(config.beta_start, config.beta_end, config.num_train_timesteps, dtype=torch.float64)
    scheduler.alphas_cumprod = torch.cumprod(1.0 - scheduler.betas, dim=0)
    scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64) if config.set_alpha_to_one else (
        scheduler.alphas_cumprod[0])
    return scheduler


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("clip,use_clipped", [("none", False), ("clip", False), ("clip", True), ("threshold", True)])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("spacing,offset,alpha_to_one,steps", [
    ("leading", 0, True, 10), ("leading", 1, False, 7), ("trailing", 0, False, 7), ("linspace", 0, True, 6),
    ("trailing", 1, True, 50)])
def test_fused_step_equals_ddim_scheduler_step(monkeypatch, prediction, clip, use_clipped, eta, spacing, offset,
                                                alpha_to_one, steps):
    config = dict(num_train_timesteps=1000, beta_start=0.0001 if alpha_to_one else 0.01, beta_end=0.02,
                  prediction_type=prediction, timestep_spacing=spacing, steps_offset=offset,
                  set_alpha_to_one=alpha_to_one, **CLIPS[clip])
    theirs = _in_float64(diffusers.DDIMScheduler(**config))
    ours = FusedDDIMScheduler.from_config(theirs.config)
    ours.betas = theirs.betas  # the same float64 β on both sides
    for scheduler in (theirs, ours):
        scheduler.set_timesteps(steps)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    current = [None]
    _contract_noise(monkeypatch, seed=11, timestep_of_call=current, module=scheduling_ddim)
    timesteps = ours.timesteps.tolist()
    # the run's first, second and last timesteps, and one outside it (diffusers' step takes any)
    for index, t in enumerate([timesteps[0], timesteps[1], timesteps[-1], 1]):
        current[0] = t
        g = torch.Generator().manual_seed(100 + index)
        x, out = torch.randn(3, 2, 5, 7, generator=g), torch.randn(3, 2, 5, 7, generator=g)
        kwargs = dict(eta=eta, use_clipped_model_output=use_clipped)
        expected = theirs.step(out.double(), t, x.double(), generator=torch.Generator().manual_seed(11), **kwargs)
        got = ours.step(out, t, x, generator=torch.Generator().manual_seed(11), **kwargs)
        got64 = ours.step(out.double(), t, x.double(), generator=torch.Generator().manual_seed(11), **kwargs)
        assert got.prev_sample.dtype == torch.float32 and got64.prev_sample.dtype == torch.float64
        # the noise is the contract's float32 draw on both sides; the rest float32 / float64 arithmetic
        assert relative_error(got.prev_sample, expected.prev_sample) < 1e-5, t
        assert relative_error(got64.prev_sample, expected.prev_sample) < 1e-12, t
        assert relative_error(got.pred_original_sample, expected.pred_original_sample) < 1e-5, t
        assert relative_error(got64.pred_original_sample, expected.pred_original_sample) < 1e-12, t


def test_zero_terminal_snr_with_v_prediction_steps_like_diffusers():
    config = dict(num_train_timesteps=1000, rescale_betas_zero_snr=True, prediction_type="v_prediction",
                  timestep_spacing="trailing", clip_sample=False)
    theirs, ours = diffusers.DDIMScheduler(**config), FusedDDIMScheduler(**config)
    for scheduler in (theirs, ours):
        scheduler.set_timesteps(10)
    assert theirs.alphas_cumprod[999] < 1e-8  # ᾱ_T = 0 up to diffusers' float32 rescaling
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    expected, got = x, x
    for t in ours.timesteps:
        expected = theirs.step(0.1 * expected, t, expected).prev_sample
        got = ours.step(0.1 * got, t, got).prev_sample
    assert relative_error(got, expected) < 1e-5


def _pipelines():
    def pipeline():
        return diffusers.DDIMPipeline(unet=_random_unet2d(SMALL_CONFIG, seed=2),
                                      scheduler=diffusers.DDIMScheduler(num_train_timesteps=1000))
    plain, fast = pipeline(), pipeline()
    assert accelerate(fast)["scheduler"] == 1 and isinstance(fast.scheduler, FusedDDIMScheduler)
    for pipe in (plain, fast):
        pipe.set_progress_bar_config(disable=True)
    return plain, fast


def test_accelerated_ddim_pipeline_equals_the_plain_one_and_saves_as_stock(tmp_path):
    plain, fast = _pipelines()
    kwargs = dict(batch_size=2, num_inference_steps=8, eta=0.0, output_type="np", use_clipped_model_output=False)
    expected = plain(generator=torch.Generator().manual_seed(0), **kwargs).images  # x_T from the generator
    got = fast(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert got.shape == (2, 16, 16, 1) and relative_error(torch.from_numpy(got), torch.from_numpy(expected)) < 1e-5
    fast.save_pretrained(tmp_path)
    loaded = diffusers.DDIMPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is diffusers.DDIMScheduler


def test_ddim_pipeline_with_eta_is_reproducible_from_a_seeded_generator():
    _, fast = _pipelines()

    def images(generator):
        return fast(batch_size=2, num_inference_steps=5, eta=1.0, generator=generator, output_type="np").images
    generator = torch.Generator().manual_seed(0)
    first, second = images(generator), images(generator)
    assert (images(torch.Generator().manual_seed(0)) == first).all() and not (second == first).all()
    # η = 0 draws nothing: diffusers' one generator per sample is taken
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    assert np.isfinite(fast(batch_size=2, num_inference_steps=3, generator=generators, output_type="np").images).all()


@pytest.mark.parametrize("config,match", [
    (dict(thresholding=True, sample_max_value=2.0), "thresholding with sample_max_value=2.0"),
    (dict(clip_sample_range=2.0), "clip_sample_range=2.0"),
    (dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr=True with prediction_type='epsilon'"),
    (dict(prediction_type="flow"), "prediction_type='flow'"),
])
def test_options_the_fused_step_does_not_cover_are_refused_and_left_to_diffusers(config, match):
    ours = FusedDDIMScheduler(num_train_timesteps=1000, **config)
    ours.set_timesteps(10)
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(NotImplementedError, match=match):
        ours.step(x, 901, x)
    pipe = diffusers.DDIMPipeline(unet=_random_unet2d(SMALL_CONFIG), scheduler=diffusers.DDIMScheduler(**config))
    assert accelerate(pipe)["scheduler"] == 0 and type(pipe.scheduler) is diffusers.DDIMScheduler


def test_bad_ddim_step_calls():
    ours = FusedDDIMScheduler(num_train_timesteps=1000)
    x = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="call set_timesteps first"):
        ours.step(x, 900, x)
    ours.set_timesteps(10)
    for eta, error in ((1.5, ValueError), (-0.1, ValueError)):
        with pytest.raises(error, match=r"eta must be a number in \[0, 1\]"):
            ours.step(x, 900, x, eta=eta)
    with pytest.raises(NotImplementedError, match="variance_noise"):
        ours.step(x, 900, x, eta=0.5, variance_noise=x)
    with pytest.raises(ValueError, match=r"timestep must lie in \[0, 1000\)"):
        ours.step(x, 1000, x)
    with pytest.raises(NotImplementedError, match="one generator per sample"):
        ours.step(x, 900, x, eta=0.5, generator=[torch.Generator(), torch.Generator()])
    assert ours.step(x, 900, x, generator=[torch.Generator(), torch.Generator()]).prev_sample.shape == x.shape
