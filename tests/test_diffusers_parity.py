"""External anchors (DESIGN §6): diffusers' DDPMScheduler/DDIMScheduler steps and its
UNet2DModel give our numbers for the same model output, noise and weights."""
import json

import pytest
import torch

from ddpm_fast import NoiseSchedule, Sampler, UNet
from ddpm_fast.integrations.diffusers import (convert_diffusers_state_dict, from_diffusers, unet_config_from_diffusers,
                                              unet_config_to_diffusers)
from ddpm_fast.reference import diffusion as D
from helpers import relative_error

diffusers = pytest.importorskip("diffusers")

# google/ddpm-cifar10-32's configuration
CIFAR10_CONFIG = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None, norm_eps=1e-6, freq_shift=1, flip_sin_to_cos=False, downsample_padding=0,
    act_fn="silu", norm_num_groups=32, time_embedding_type="positional", center_input_sample=False,
    mid_block_scale_factor=1)
SMALL_CONFIG = {**CIFAR10_CONFIG, "sample_size": 16, "in_channels": 1, "out_channels": 1,
                "block_out_channels": (32, 64), "layers_per_block": 1, "norm_num_groups": 8,
                "down_block_types": ("DownBlock2D", "AttnDownBlock2D"), "up_block_types": ("AttnUpBlock2D", "UpBlock2D")}


def _random_unet2d(config, seed=0):
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():  # diffusers zero-inits nothing we rely on; make every weight matter
            p.normal_(0, 0.05)
    return model


def _in_float64(scheduler):
    # diffusers keeps its tables in float32, where 1 − ᾱ_t near t = 0 loses half its digits;
    # in float64 its formulas and ours must agree to rounding.
    scheduler.betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    scheduler.alphas = 1.0 - scheduler.betas
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)
    scheduler.one = scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return scheduler


def _step_inputs(seed, shape=(4, 3, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("t", [999, 500, 37, 1, 0])
def test_ddpm_scheduler_step(variance, clip, t):
    theirs = _in_float64(diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                                 variance_type=variance, clip_sample=clip))
    ours = NoiseSchedule.linear(1000)
    x, eps = _step_inputs(t)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + t), dtype=torch.float64)
    expected = theirs.step(eps, t, x, generator=torch.Generator().manual_seed(100 + t)).prev_sample  # draws `noise`
    got = D.p_sample(ours, eps, x, torch.full((4,), t), noise, clip_denoised=clip, variance=variance)
    assert relative_error(got, expected) < 1e-12


def test_default_float32_scheduler_agrees_to_float32_rounding():
    # What users run: diffusers' float32 tables. Away from t ≈ 0 the float32 rounding is small.
    theirs = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type="fixed_small")
    x, eps = (v.float() for v in _step_inputs(0))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    expected = theirs.step(eps, 500, x, generator=torch.Generator().manual_seed(1)).prev_sample
    got = D.p_sample(NoiseSchedule.linear(1000), eps, x, torch.full((4,), 500), noise, variance="fixed_small")
    assert relative_error(got, expected) < 1e-5


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip", [True, False])
def test_ddim_scheduler_steps(eta, clip):
    theirs = _in_float64(diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=clip,
                                                 set_alpha_to_one=True, steps_offset=0))
    theirs.set_timesteps(50)
    ours = NoiseSchedule.linear(1000)
    kept = ours.timesteps(50, "uniform")
    assert theirs.timesteps.tolist() == kept
    for index, t in enumerate(kept):
        x, eps = _step_inputs(index)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(index), dtype=torch.float64)
        expected = theirs.step(eps, t, x, eta=eta, use_clipped_model_output=True, variance_noise=noise).prev_sample
        t_prev = kept[index + 1] if index + 1 < len(kept) else -1
        got = D.ddim_step(ours, eps, x, torch.full((4,), t), torch.full((4,), t_prev), noise, eta, clip)
        assert relative_error(got, expected) < 1e-12, t


def test_cifar10_unet_matches_diffusers():
    theirs = _random_unet2d(CIFAR10_CONFIG)
    ours = from_diffusers(theirs).eval()
    assert sum(p.numel() for p in ours.parameters()) == 35_746_307
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 32, 32, generator=g), torch.tensor([0, 999])
    with torch.no_grad():
        assert relative_error(ours(x, t), theirs(x, t).sample) < 1e-5


def test_diffusers_folder_loads_and_old_attention_names(tmp_path):
    theirs = _random_unet2d(SMALL_CONFIG, seed=1)
    theirs.save_pretrained(tmp_path / "unet")
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(3, 1, 16, 16, generator=g), torch.tensor([5, 50, 500])
    with torch.no_grad():
        expected = theirs(x, t).sample
        assert relative_error(UNet.from_pretrained(tmp_path / "unet")(x, t), expected) < 1e-5
    # checkpoints saved before diffusers 0.14 name the attention projections query/key/value/proj_attn
    old = {k.replace("to_q", "query").replace("to_k", "key").replace("to_v", "value").replace("to_out.0", "proj_attn"): v
           for k, v in theirs.state_dict().items()}
    config = unet_config_from_diffusers(SMALL_CONFIG)
    ours = UNet(**config).load_checked(convert_diffusers_state_dict(old, len(config["ch_mult"])), "old names").eval()
    with torch.no_grad():
        assert relative_error(ours(x, t), expected) < 1e-5


def test_a_bin_checkpoint_loads_without_unpickling_code(tmp_path):
    theirs = _random_unet2d(SMALL_CONFIG, seed=2)
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(theirs.config)))
    torch.save(theirs.state_dict(), folder / "diffusion_pytorch_model.bin")
    ours = UNet.from_pretrained(folder)
    assert torch.equal(ours.conv_out.weight, theirs.conv_out.weight)


@pytest.mark.parametrize("change,match", [
    (dict(flip_sin_to_cos=True), "flip_sin_to_cos"), (dict(freq_shift=0), "freq_shift"),
    (dict(norm_eps=1e-5), "norm_eps"), (dict(downsample_padding=1), "downsample_padding"),
    (dict(attention_head_dim=8), "one head"), (dict(act_fn="gelu"), "act_fn"),
    (dict(up_block_types=("UpBlock2D", "UpBlock2D")), "mirror"),
    (dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D")), "down_block_types"),
])
def test_non_ddpm_configs_are_refused(change, match):
    with pytest.raises(ValueError, match=match):
        unet_config_from_diffusers({**SMALL_CONFIG, **change})


def test_missing_weights_are_named(tmp_path):
    theirs = _random_unet2d(SMALL_CONFIG)
    state = convert_diffusers_state_dict(theirs.state_dict(), 2)
    del state["conv_out.bias"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \['conv_out.bias'\].*unexpected keys \['extra.weight'\]"):
        UNet(**unet_config_from_diffusers(SMALL_CONFIG)).load_checked(state, "test")


def test_sampler_accepts_a_diffusers_model_as_is():
    theirs = _random_unet2d(SMALL_CONFIG, seed=3)
    schedule = NoiseSchedule.linear(1000)
    a = Sampler(theirs, schedule, method="ddim", steps=5, eta=0.5).sample(3, seed=4)
    b = Sampler(from_diffusers(theirs), schedule, method="ddim", steps=5, eta=0.5).sample(3, seed=4)
    assert a.shape == (3, 1, 16, 16)
    assert relative_error(a, b) < 1e-5


@pytest.mark.parametrize("ours", [UNet.ddpm_cifar10, lambda: UNet.from_pretrained("digits")], ids=["cifar10", "digits"])
def test_config_to_diffusers_builds_the_same_network(ours):
    # what the benchmarks time diffusers with: the same architecture, checked by converting back
    # and by running both on the same weights
    model = ours().eval()
    unet2d = diffusers.UNet2DModel(**unet_config_to_diffusers(model.config)).eval()
    assert unet_config_from_diffusers(dict(unet2d.config)) == model.config
    converted = from_diffusers(unet2d).eval()
    x = torch.randn(2, model.in_channels, model.resolution, model.resolution)
    t = torch.tensor([3, 700])
    with torch.no_grad():
        assert relative_error(converted(x, t), unet2d(x, t).sample) < 1e-5
