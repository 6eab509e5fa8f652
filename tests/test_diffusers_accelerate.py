"""accelerate() on diffusers models and pipelines, and FusedDDPMScheduler against DDPMScheduler
(DESIGN §6: an accelerated model gives the plain model's numbers; the fused step gives
diffusers' step for the same noise)."""
import copy

import pytest
import torch

import ddpm_fast as df
from helpers import relative_error
from test_diffusers_parity import CIFAR10_CONFIG, SMALL_CONFIG, _in_float64, _random_unet2d

diffusers = pytest.importorskip("diffusers")
from ddpm_fast.integrations.diffusers import FusedDDPMScheduler, accelerate  # noqa: E402
from ddpm_fast.integrations.diffusers.scheduler import draw_seed  # noqa: E402

scheduling_ddpm = pytest.importorskip("diffusers.schedulers.scheduling_ddpm")


def _resnets(model):
    return sum(isinstance(m, diffusers.models.resnet.ResnetBlock2D) for m in model.modules())


def _inputs(batch, config, seed=0, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config["in_channels"], config["sample_size"], config["sample_size"], generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return (x.to(memory_format=torch.channels_last) if channels_last else x), t


@pytest.mark.parametrize("channels_last", [False, True])
def test_accelerated_cifar10_unet_equals_the_plain_one(channels_last):
    model = _random_unet2d(CIFAR10_CONFIG)
    keys = list(model.state_dict())
    convs = sum(type(m) is torch.nn.Conv2d for m in model.modules())
    x, t = _inputs(2, CIFAR10_CONFIG, seed=3, channels_last=channels_last)
    with torch.no_grad():
        expected = model(x, t).sample
        counts = accelerate(model)
        got = model(x, t).sample
    assert counts == {"resnets": _resnets(model), "resnets_left": 0, "final_norm": 1, "attention": 6,
                      "convs": convs}
    assert counts["resnets"] == 22 and type(model.conv_act) is torch.nn.Identity
    assert list(model.state_dict()) == keys  # checkpoints still load and save under diffusers' names
    assert relative_error(got, expected) < 1e-5
    with torch.no_grad():  # a second call changes nothing
        assert accelerate(model) == counts and torch.equal(model(x, t).sample, got)


@pytest.mark.parametrize("channels_last", [False, True])
def test_accelerated_unet_with_every_conv_packed_equals_the_float64_model(channels_last):
    # DESIGN §5.8: the packed plan forced on every convolution (auto may measure "torch" faster),
    # the residual adds inside the convolutions, against the plain model in float64
    from ddpm_fast.ops.conv2d import PackedConv2d
    model = _random_unet2d(SMALL_CONFIG, seed=2)
    x, t = _inputs(3, SMALL_CONFIG, seed=5, channels_last=channels_last)
    with torch.no_grad():
        expected = copy.deepcopy(model).double()(x.double(), t).sample
        accelerate(model)
        packed = [m for m in model.modules() if isinstance(m, PackedConv2d)]
        for module in packed:
            module.impl = "packed"
        got = model(x, t).sample
    assert len(packed) == sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) > 0
    assert relative_error(got, expected) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_accelerated_unet_in_low_precision(dtype):
    # DESIGN §6: below 1e-2, or at most 2× the plain model's own low-precision error.
    model = _random_unet2d(SMALL_CONFIG, seed=1)
    x, t = _inputs(3, SMALL_CONFIG, seed=4)
    with torch.no_grad():
        exact = model.double()(x.double(), t).sample
        plain = model.to(dtype)(x.to(dtype), t).sample
        accelerate(model)
        fused = model(x.to(dtype), t).sample
    assert fused.dtype == dtype
    assert relative_error(fused, exact) <= max(1e-2, 2 * relative_error(plain, exact))


def test_blocks_the_fused_maths_does_not_cover_are_left_alone():
    model = _random_unet2d({**SMALL_CONFIG, "resnet_time_scale_shift": "scale_shift"})
    x, t = _inputs(2, SMALL_CONFIG)
    with torch.no_grad():
        expected = model(x, t).sample
        counts = accelerate(model)
        got = model(x, t).sample
    assert counts["resnets"] == 0 and counts["resnets_left"] == _resnets(model) > 0
    assert relative_error(got, expected) < 1e-5


def _contract_noise(monkeypatch, seed, timestep_of_call, module=scheduling_ddpm):
    """Make diffusers' DDPMScheduler (the scheduler of `module`) draw ddpm_fast's noise for (seed,
    sample index, timestep), so both steps see the same z: the seed drawn from the step's
    generator as the fused step draws it (DESIGN §9), `seed` for a step without one."""
    def randn_tensor(shape, generator=None, device=None, dtype=None, **kwargs):
        z = df.randn(shape, seed=seed if generator is None else draw_seed(generator), step=timestep_of_call[0])
        return z.to(device=device or "cpu", dtype=dtype or torch.float32)
    monkeypatch.setattr(module, "randn_tensor", randn_tensor)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "fixed_small_log"])
@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("steps,spacing", [(None, "leading"), (50, "leading"), (20, "trailing"), (7, "linspace")])
def test_fused_step_equals_ddpm_scheduler_step(monkeypatch, variance, prediction, clip, steps, spacing):
    config = dict(num_train_timesteps=1000, beta_schedule="linear", variance_type=variance, clip_sample=clip,
                  prediction_type=prediction, timestep_spacing=spacing)
    theirs = _in_float64(diffusers.DDPMScheduler(**config))
    ours = FusedDDPMScheduler.from_config(theirs.config)
    for scheduler in (theirs, ours):
        if steps is not None:
            scheduler.set_timesteps(steps)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    current = [None]
    _contract_noise(monkeypatch, seed=11, timestep_of_call=current)
    timesteps = ours.timesteps.tolist()
    for index in sorted({0, 1, len(timesteps) // 2, len(timesteps) - 1}):
        t = timesteps[index]
        current[0] = t
        g = torch.Generator().manual_seed(100 + index)
        x, out = torch.randn(3, 3, 9, 7, generator=g), torch.randn(3, 3, 9, 7, generator=g)
        expected = theirs.step(out.double(), t, x.double(), generator=torch.Generator().manual_seed(11))
        got = ours.step(out, t, x, generator=torch.Generator().manual_seed(11))
        assert got.prev_sample.dtype == torch.float32
        assert relative_error(got.prev_sample, expected.prev_sample) < 1e-5, t
        assert relative_error(got.pred_original_sample, expected.pred_original_sample) < 1e-5, t


def test_fused_step_with_diffusers_float32_tables_and_layouts(monkeypatch):
    # What users run: diffusers' own float32 tables; plus channels_last and bf16 network output.
    theirs = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    ours = FusedDDPMScheduler.from_config(theirs.config)
    current = [500]
    _contract_noise(monkeypatch, seed=5, timestep_of_call=current)
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    expected = theirs.step(out, 500, x, generator=torch.Generator().manual_seed(5)).prev_sample
    cl = x.to(memory_format=torch.channels_last)
    got = ours.step(out, 500, cl, generator=torch.Generator().manual_seed(5)).prev_sample
    assert relative_error(got, expected) < 1e-5
    assert torch.equal(cl, x)  # step() leaves its input alone, as diffusers' does
    low = ours.step(out.bfloat16(), 500, x.bfloat16(), generator=torch.Generator().manual_seed(5)).prev_sample
    assert low.dtype == torch.bfloat16 and relative_error(low, expected) < 1e-2


def test_accelerated_pipeline_equals_the_plain_pipeline(monkeypatch):
    def pipeline():
        return diffusers.DDPMPipeline(unet=_random_unet2d(SMALL_CONFIG, seed=2),
                                      scheduler=diffusers.DDPMScheduler(num_train_timesteps=1000))
    plain, fast = pipeline(), pipeline()
    counts = accelerate(fast)
    assert counts["scheduler"] == 1 and isinstance(fast.scheduler, FusedDDPMScheduler)
    assert counts["resnets"] == _resnets(fast.unet) and counts["attention"] == 4
    current = [None]
    _contract_noise(monkeypatch, seed=7, timestep_of_call=current)
    trajectories = {"plain": [], "fast": []}
    for name, pipe in (("plain", plain), ("fast", fast)):
        step = pipe.scheduler.step

        def recorded(model_output, timestep, sample, *args, _step=step, _name=name, **kwargs):
            current[0] = int(timestep)  # the plain scheduler's z is then the contract's for this t
            out = _step(model_output, timestep, sample, *args, **kwargs)
            # the network's output (clipping makes a random network's images insensitive to it)
            # and x_{t-1} before the pipeline's clamp to [0, 1]
            trajectories[_name].append((model_output, out.prev_sample))
            return out
        pipe.scheduler.step = recorded
        pipe.set_progress_bar_config(disable=True)
    expected = plain(batch_size=2, num_inference_steps=10, generator=torch.Generator().manual_seed(7),
                     output_type="np").images
    got = fast(batch_size=2, num_inference_steps=10, generator=torch.Generator().manual_seed(7), output_type="np").images
    assert got.shape == expected.shape == (2, 16, 16, 1)
    assert len(trajectories["fast"]) == len(trajectories["plain"]) == 10
    for step, ((out, x), (out_plain, x_plain)) in enumerate(zip(trajectories["fast"], trajectories["plain"])):
        assert relative_error(out, out_plain) < 1e-5 and relative_error(x, x_plain) < 1e-5, step
    assert relative_error(torch.from_numpy(got), torch.from_numpy(expected)) < 1e-5


@pytest.mark.parametrize("config,match", [
    (dict(thresholding=True), "thresholding"),
    (dict(clip_sample_range=2.0), "clip_sample_range"),
])
def test_unsupported_scheduler_options_are_refused(config, match):
    scheduler = FusedDDPMScheduler(num_train_timesteps=1000, **config)
    with pytest.raises(NotImplementedError, match=match):
        scheduler.step(torch.zeros(1, 1, 2, 2), 10, torch.zeros(1, 1, 2, 2), generator=torch.Generator())


def test_bad_step_calls():
    scheduler = FusedDDPMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(10)
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="timestep 5 is not one of"):
        scheduler.step(x, 5, x)
    with pytest.raises(ValueError, match="shape"):
        scheduler.step(torch.zeros(1, 2, 2, 2), 900, x)
    with pytest.raises(NotImplementedError, match="one generator"):
        scheduler.step(x, 900, x, generator=[torch.Generator()])
    with pytest.raises(TypeError, match="UNet2DModel"):
        accelerate(object())


def test_runs_without_a_generator_draw_a_seed_per_run_unless_one_is_set():
    scheduler = FusedDDPMScheduler(num_train_timesteps=1000)
    x = torch.zeros(2, 1, 4, 4)
    draws = []
    for _ in range(2):
        scheduler.set_timesteps(10)
        draws.append(scheduler.step(x, 900, x).prev_sample)
    assert not torch.equal(draws[0], draws[1])
    scheduler.seed = 3
    scheduler.set_timesteps(10)
    first = scheduler.step(x, 900, x).prev_sample
    scheduler.set_timesteps(10)
    assert torch.equal(scheduler.step(x, 900, x).prev_sample, first)
