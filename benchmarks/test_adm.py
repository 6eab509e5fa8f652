"""The ADM U-Net of guided-diffusion's ImageNet 64×64 conditional model (preset 64x64_diffusion,
DESIGN §2.7): one forward, and a respaced learned-range sampling run, ours against
guided-diffusion's own code run as its users run it (eager; its fp16 torso on a GPU, as its flags
say) and against torch.compile of that code, with the same weights.

Their code is not on PyPI: GUIDED_DIFFUSION_PATH names a checkout of openai/guided-diffusion (its
rows are skipped, saying so, without one). On a GPU the network is the preset's, bf16 + CUDA
graph for ours; on a CPU a reduced one (64 channels, one ResBlock a level; one thread is the
goal's setting) and --quick smaller still. Work: the forward's flops, counted by torch.

    GUIDED_DIFFUSION_PATH=/path/to/guided-diffusion pytest benchmarks/test_adm.py --benchmark-only
"""
from __future__ import annotations

import functools
import os
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import settings
from ddpm_fast import ADMUNet, Sampler
from ddpm_fast.adm_checkpoints import PRESETS, guided_model_config, sampling

DEVICE = settings.DEVICE
CHECKOUT = os.environ.get("GUIDED_DIFFUSION_PATH")
# "eager" is guided-diffusion's own code as its users run it (the group's eager reference, conftest.measure)
VARIANTS = ("eager", "ours", "torch.compile")
BATCH = 16 if settings.ON_GPU else 1
RESPACING = "250" if settings.ON_GPU else ("5" if settings.QUICK else "25")


def flags() -> dict:
    """create_model's keywords: the preset's, reduced on a CPU (their fp16 torso only on a GPU)."""
    f = PRESETS["64x64_diffusion"].model_flags() | dict(use_fp16=settings.ON_GPU, dropout=0.0)
    if not settings.ON_GPU:
        f |= dict(num_channels=64, num_res_blocks=1, image_size=32, channel_mult="1,2,3,4") if settings.QUICK else dict(
            num_channels=64, num_res_blocks=1)
    return f


@functools.cache
def networks() -> tuple[torch.nn.Module | None, ADMUNet]:
    """(their UNetModel or None without a checkout, ours holding the same weights), eval mode."""
    torch.manual_seed(0)
    ours = ADMUNet(**guided_model_config(**flags())).eval()
    with torch.no_grad():  # their zero-initialised output layers would give ε ≡ 0: random weights
        for p in ours.parameters():
            p.add_(0.02 * torch.randn_like(p))
    theirs = None
    if CHECKOUT:
        sys.path.insert(0, CHECKOUT)
        from guided_diffusion.script_util import create_model
        theirs = create_model(**flags()).eval()
        state = ours.state_dict()
        theirs.load_state_dict({k: v.to(theirs.state_dict()[k].dtype) for k, v in state.items()})
    ours = ours.to(DEVICE, torch.bfloat16 if settings.ON_GPU else torch.float32)
    return (None if theirs is None else theirs.to(DEVICE)), ours


def inputs(batch: int):
    g = torch.Generator().manual_seed(1)
    size = flags()["image_size"]
    return (torch.randn(batch, 3, size, size, generator=g).to(DEVICE), torch.randint(0, 1000, (batch,), generator=g)
            .to(DEVICE), torch.randint(0, 1000, (batch,), generator=g).to(DEVICE))


@functools.cache
def flops_per_image() -> int:
    _, ours = networks()
    x, t, y = inputs(1)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        ours(x.to(next(ours.parameters()).dtype), t, y)
    return counter.get_total_flops()


def their_model(variant: str):
    theirs, _ = networks()
    if theirs is None:
        pytest.skip("guided-diffusion's code is not on PyPI: set GUIDED_DIFFUSION_PATH to a checkout of "
                    "openai/guided-diffusion")
    return torch.compile(theirs) if variant == "torch.compile" else theirs


@pytest.mark.parametrize("variant", VARIANTS)
def test_adm_forward(measure, variant):
    x, t, y = inputs(BATCH)
    _, ours = networks()
    if variant == "ours":
        x = x.to(next(ours.parameters()).dtype)
        fn = functools.partial(ours, x, t, y)
    else:
        fn = functools.partial(their_model(variant), x, t, y)
    with torch.inference_mode():
        fn()  # compiles outside the timing
        measure(f"adm64 forward B={BATCH}", variant, fn, flops=flops_per_image() * BATCH, images=BATCH,
                kind="adm-forward", flags=flags())


@pytest.mark.parametrize("variant", VARIANTS)
def test_adm_sampling(measure, variant):
    """A learned-range run respaced as --timestep_respacing RESPACING, unguided, clip_denoised."""
    diffusion = PRESETS["64x64_diffusion"].diffusion()
    _, ours = networks()
    x, _, y = inputs(BATCH)
    if variant == "ours":
        schedule, process = sampling(diffusion)
        sampler = Sampler(ours, schedule, **(process | dict(steps=RESPACING)), cuda_graph=settings.ON_GPU)
        run = functools.partial(sampler.sample, BATCH, seed=0, labels=y.cpu())
    else:
        model = their_model(variant)
        from guided_diffusion.script_util import create_gaussian_diffusion  # networks() put the checkout on the path
        spaced = create_gaussian_diffusion(steps=diffusion["diffusion_steps"], learn_sigma=True,
                                           noise_schedule=diffusion["noise_schedule"], timestep_respacing=RESPACING)
        run = functools.partial(spaced.p_sample_loop, model, tuple(x.shape), noise=x, clip_denoised=True,
                                model_kwargs={"y": y})
    steps = len(sampling(diffusion)[0].timesteps(RESPACING))
    with torch.inference_mode():
        run()  # compiles and captures outside the timing
        measure(f"adm64 sampling {RESPACING} steps B={BATCH}", variant, run, rounds=3, warmup=0,
                flops=flops_per_image() * BATCH * steps, images=BATCH, kind="adm-sampling", steps=steps,
                flags=flags())
