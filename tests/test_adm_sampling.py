"""guided-diffusion's own sampling of an ADM U-Net, reproduced by Sampler: respaced DDPM with a
learned_range variance and classifier guidance (mean shift), unguided, and guided DDIM (score
shift), fed the same noise (tests/golden/adm_sampling.safetensors, made by
tests/golden/make_adm_sampling.py from their p_sample / ddim_sample; DESIGN §2.3, §2.5, §2.7)."""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ddpm_fast import NoiseSchedule, Sampler
from ddpm_fast.adm import ADMClassifier, ADMUNet
from ddpm_fast.adm_checkpoints import (from_guided_diffusion, from_improved_diffusion, improved_model_config, sampling,
                                       timestep_scale)
from helpers import relative_error

with safe_open(str(Path(__file__).parent / "golden" / "adm_sampling.safetensors"), framework="pt") as _f:
    GOLDEN, META = {k: _f.get_tensor(k) for k in _f.keys()}, _f.metadata()
RUNS = json.loads(META["runs"])


def networks(backend: str):
    args = {k: v for k, v in json.loads(META["model_args"]).items() if k != "use_fp16"}
    model = ADMUNet(**args, backend=backend).load_checked(_part("model."), "model").eval()
    cargs = {k: v for k, v in json.loads(META["classifier_args"]).items() if k not in ("use_fp16", "pool")}
    classifier = ADMClassifier(**cargs, backend=backend).load_checked(_part("classifier."), "classifier").eval()
    return model, classifier


def _part(prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in GOLDEN.items() if k.startswith(prefix)}


def sampler_for(run: str, backend: str) -> Sampler:
    method, respacing, guided = RUNS[run]
    model, classifier = networks(backend)
    diffusion = json.loads(META["diffusion"])
    schedule = NoiseSchedule.linear(diffusion["steps"])
    return Sampler(model, schedule, method=method, steps=respacing, variance="learned_range", backend=backend,
                   classifier=classifier if guided else None,
                   classifier_scale=float(META["classifier_scale"]) if guided else None)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("run", sorted(RUNS))
def test_a_whole_run_reproduces_guided_diffusions_own(run, backend):
    x0 = sampler_for(run, backend).sample(2, seed=int(META["seed"]), labels=GOLDEN["labels"])
    assert relative_error(x0, GOLDEN[f"{run}.x0"]) < 1e-4


@pytest.mark.parametrize("run", sorted(RUNS))
def test_the_first_step_reproduces_their_p_sample(run):
    sampler = sampler_for(run, "cpu")
    with torch.inference_mode():
        x, step = sampler.stepper(2, seed=int(META["seed"]), labels=GOLDEN["labels"])
        step()
    assert relative_error(x, GOLDEN[f"{run}.first"]) < 1e-5


def test_guidance_is_what_moves_the_guided_run():
    # the fixture would not tell a sampler that drops the classifier from one that uses it otherwise
    moved = (GOLDEN["ddpm_guided.x0"] - GOLDEN["ddpm.x0"]).abs().mean()
    assert moved > 100 * 1e-4


def test_their_diffusion_flags_give_their_process():
    schedule, kwargs = sampling(dict(diffusion_steps=4000, noise_schedule="linear", learn_sigma=True, sigma_small=False,
                                     predict_xstart=False, timestep_respacing="ddim50", rescale_timesteps=True))
    assert schedule.betas[0].item() == pytest.approx(0.1 / 4000, rel=1e-15)
    assert schedule.betas[-1].item() == pytest.approx(20 / 4000, rel=1e-15)
    assert kwargs == dict(variance="learned_range", prediction_type="epsilon", steps="ddim50")
    assert timestep_scale(dict(diffusion_steps=4000, rescale_timesteps=True)) == 0.25
    assert timestep_scale(dict(diffusion_steps=4000, rescale_timesteps=False)) == 1.0
    with pytest.raises(ValueError, match="noise_schedule"):
        sampling(dict(diffusion_steps=10, noise_schedule="sqrt", learn_sigma=False, predict_xstart=False,
                      timestep_respacing=""))


def test_a_rescaled_model_sees_t_times_1000_over_T():
    model, _ = networks("reference")
    rescaled = ADMUNet(**{**model.config, "timestep_scale": 0.25}, backend="reference").eval()
    rescaled.load_state_dict(model.state_dict())
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(rescaled(x, torch.tensor([400, 8]), y), model(x, torch.tensor([100.0, 2.0]), y))
    with pytest.raises(ValueError, match="timestep_scale"):
        ADMUNet(**{**model.config, "timestep_scale": 0.0})


def test_improved_diffusions_loaders_rescale_t_as_its_scripts_do():
    flags = dict(image_size=32, num_channels=32, num_res_blocks=1, learn_sigma=True)
    state = ADMUNet(**improved_model_config(**flags)).state_dict()
    assert from_improved_diffusion(state, **flags, diffusion_steps=4000).timestep_scale == 0.25  # their default
    assert from_improved_diffusion(state, **flags, diffusion_steps=4000, rescale_timesteps=False).timestep_scale == 1.0
    assert from_guided_diffusion(state, **flags, use_scale_shift_norm=True, num_heads=4, channel_mult="1,2,2,2",
                                 attention_resolutions="16,8", diffusion_steps=4000).timestep_scale == 1.0
