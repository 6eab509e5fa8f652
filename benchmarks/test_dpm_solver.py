"""DPM-Solver++(2M) sampling runs (DESIGN §2.4), ours against what a diffusers user runs: the
same network as a diffusers UNet2DModel stepped by the stock DPMSolverMultistepScheduler. Both
make DPM_STEPS network evaluations from a fresh x_T (fewer at the --quick sizes). Its quality
against DDPM's 1000 steps is measured by benchmarks/quality_vs_steps.py.

    pytest benchmarks/test_dpm_solver.py --benchmark-only [--quick]
"""
import pytest
import torch

from benchmarks import settings, workloads
from benchmarks.timing import synchronized
from ddpm_fast import NoiseSchedule, Sampler
from ddpm_fast.integrations.diffusers import unet_config_to_diffusers

DPM_STEPS = 20
VARIANTS = ("ours + CUDA graph", "ours", "diffusers")  # ours first: make gpu-check's stage may be cut


def _cases():
    sizes = settings.sizes()
    # the sampling workloads, each with the variants it runs
    return [(e2e, config, variant) for e2e in sizes.e2e if e2e.sample_steps for config in sizes.e2e_configs
            for variant in VARIANTS if e2e.variants is None or variant in e2e.variants]


def _ours(model: str, config: str, batch: int, graph: bool):
    dtype, layout = settings.CONFIGS[config]
    net = workloads._base_model(model).to(device=settings.DEVICE, dtype=dtype, memory_format=layout).eval()
    samplers = {}  # one per step count: building the table stays out of the timing

    def sample(steps):
        if steps not in samplers:
            samplers[steps] = Sampler(net, NoiseSchedule.linear(1000), method="dpm-solver++", steps=steps,
                                      dtype=dtype, cuda_graph=graph)
        return samplers[steps].sample(batch)
    return sample


def _diffusers(model: str, config: str, batch: int):
    import diffusers
    dtype, layout = settings.CONFIGS[config]
    net = workloads._base_model(model)
    unet = diffusers.UNet2DModel(**unet_config_to_diffusers(net.config)).to(
        device=settings.DEVICE, dtype=dtype, memory_format=layout).eval()
    scheduler = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear")
    shape = (batch, net.in_channels, net.resolution, net.resolution)

    @torch.inference_mode()
    def sample(steps):
        scheduler.set_timesteps(steps)
        x = torch.randn(shape, device=settings.DEVICE, dtype=dtype)
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x).prev_sample
        return x
    return sample


@pytest.mark.parametrize("case", _cases(), ids=workloads.case_id)
def test_dpm_solver_sampling(measure, case):
    e2e, config, variant = case
    reason = workloads.available(variant)
    if reason:
        pytest.skip(reason)
    if variant == "diffusers":
        sample = _diffusers(e2e.model, config, e2e.batch)
    else:
        sample = _ours(e2e.model, config, e2e.batch, graph=variant == "ours + CUDA graph")
    steps = min(DPM_STEPS, e2e.sample_steps)
    synchronized(lambda: sample(steps), settings.DEVICE)()  # captures and autotunes, finished before round 1
    measure(f"e2e dpm-solver++ {e2e.model} {config} B={e2e.batch} steps={steps}", variant, lambda: sample(steps),
            rounds=e2e.sample_rounds or settings.sizes().sample_rounds, warmup=0,
            flops=workloads.flops_per_image(e2e.model) * e2e.batch * steps, images=e2e.batch, kind="e2e-dpm-solver",
            model=e2e.model, config=config, batch=e2e.batch, steps=steps, cuda_graph=variant == "ours + CUDA graph")
