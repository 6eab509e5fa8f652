"""End-to-end CPU runs for the convolution report (DESIGN §5.8, §7): ours — the default path
with packed convolutions — against ours with every convolution on F.conv2d (the path before),
and against what a user runs instead: diffusers' UNet2DModel of the same architecture stepped
by its own scheduler, eager and through torch.compile at its best on a CPU (the U-Net compiled
with Inductor's freezing, which pre-packs the convolution weights; the update in floats).

A DDPM workload times `steps` consecutive steps of the 1000-step chain (every step is one
network evaluation and one update, so a window of the chain costs in proportion); the
DPM-Solver++(2M) workload is a whole 20-step run from fresh noise."""
from __future__ import annotations

import copy
import dataclasses
import functools
import time
from typing import Callable

import torch

from benchmarks.conv_shapes import interleaved
from ddpm_fast import NoiseSchedule, Sampler, UNet
from ddpm_fast.integrations.diffusers import unet_config_to_diffusers
from ddpm_fast.ops.conv2d import PackedConv2d

VARIANTS = ("ours", "ours, F.conv2d", "diffusers", "diffusers + torch.compile")


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    model: str  # "cifar10" or "digits"
    batch: int
    steps: int  # DDPM steps timed per round, or the DPM-Solver++ run's steps
    rounds: int
    method: str = "ddpm"


def base_model(model: str) -> UNet:
    torch.manual_seed(0)
    return (UNet.ddpm_cifar10() if model == "cifar10" else UNet.from_pretrained(model)).eval()


def _ours(net: UNet, batch: int, method: str) -> Callable[[int], None]:
    """advance(k): k more steps of the DDPM chain, or a whole k-step DPM-Solver++ run."""
    if method == "dpm-solver++":
        samplers = {}

        def sample(k):
            samplers.setdefault(k, Sampler(net, NoiseSchedule.linear(1000), method="dpm-solver++", steps=k))
            samplers[k].sample(batch)
        return sample
    sampler = Sampler(net, NoiseSchedule.linear(1000), method="ddpm")
    chain = {"left": 0}

    def advance(k):
        if chain["left"] < k:  # a fresh x_T once the chain's 1000 rows are used up
            chain["step"], chain["left"] = sampler.stepper(batch)[1], 1000
        for _ in range(k):
            chain["step"]()
        chain["left"] -= k
    return advance


@functools.cache
def _unet2d(model: str, batch: int, compiled: bool) -> Callable:
    """UNet2DModel of the same architecture, one per batch (a compiled one holds its batch's graph)."""
    import diffusers
    unet = diffusers.UNet2DModel(**unet_config_to_diffusers(base_model(model).config)).eval()
    return torch.compile(unet, options={"freezing": True}) if compiled else unet


def _diffusers(model: str, batch: int, method: str, compiled: bool) -> Callable[[int], None]:
    """The same with UNet2DModel and diffusers' scheduler, as its pipelines loop."""
    import diffusers
    forward, config = _unet2d(model, batch, compiled), base_model(model).config
    shape = (batch, config["in_channels"], config["resolution"], config["resolution"])
    if method == "dpm-solver++":
        scheduler = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear")
    else:
        scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True,
                                            variance_type="fixed_large")
    chain = {"left": 0}

    def advance(k):
        if method == "dpm-solver++" or chain["left"] < k:
            scheduler.set_timesteps(k if method == "dpm-solver++" else 1000)
            chain["x"], chain["left"] = torch.randn(shape), len(scheduler.timesteps)
        start = len(scheduler.timesteps) - chain["left"]
        for t in scheduler.timesteps[start:start + k]:
            chain["x"] = scheduler.step(forward(chain["x"], t).sample, t, chain["x"]).prev_sample
        chain["left"] -= k
    return advance


@functools.cache
def variants(model: str, batch: int, method: str, warm: int) -> tuple[dict[str, Callable[[int], None]], dict[str, float]]:
    """The four variants' advance(k) for this model and batch, each warmed up (compiled, packed,
    calibrated) by advance(warm), and the seconds that first call took."""
    net = base_model(model)
    unpacked = copy.deepcopy(net)
    for module in unpacked.modules():
        if isinstance(module, PackedConv2d):
            module.impl = "torch"
    fns = {"ours": _ours(net, batch, method), "ours, F.conv2d": _ours(unpacked, batch, method),
           "diffusers": _diffusers(model, batch, method, compiled=False),
           "diffusers + torch.compile": _diffusers(model, batch, method, compiled=True)}
    first = {}
    with torch.inference_mode():
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(warm)
            first[name] = time.perf_counter() - start
    return fns, first


def measure(work: Workload) -> dict:
    """Seconds of every variant's timed rounds (interleaved, no further warm-up) and first calls."""
    fns, first = variants(work.model, work.batch, work.method, work.steps if work.method == "dpm-solver++" else 1)
    with torch.inference_mode():
        times = interleaved({name: functools.partial(fn, work.steps) for name, fn in fns.items()}, work.rounds,
                            warmup=0)
    return dict(workload=dataclasses.asdict(work), first_call_s=first, seconds=times)
