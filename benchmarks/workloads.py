"""End-to-end workloads: one denoising step (U-Net forward + update) and a sampling run, for
every variant the report compares, built once per (model, config, batch) and shared by the
step and sampling benchmarks and the time breakdown (so max-autotune compiles once).

Variants — like for like: each runs in the config's dtype and memory layout (CONFIGS), and
`cuda_graph` says whether it replays CUDA graphs (the report pairs ours with a baseline of
the same graph use):
  eager                       U-Net on PyTorch's own ops (backend="torch": F.group_norm, F.silu,
                              scaled_dot_product_attention) + the update as a user writes it
                              (`update` below: the row a tensor, the clip a Python bool, noise from
                              torch.randn_like), a Python loop
  torch.compile               the same step function through torch.compile(fullgraph=True), default
                              mode (no CUDA graphs): make gpu-check's variants only (settings.py)
  torch.compile max-autotune  the same through torch.compile(mode="max-autotune", fullgraph=True)
                              (CUDA graphs on GPUs: mode max-autotune captures them)
  torch.compile U-Net + eager update
                              torch.compile(unet) (default mode), the update eager: what a user
                              who compiles only the model runs
  diffusers                   UNet2DModel (same architecture) + DDPMScheduler, as its pipeline loops
  reference sampler           Sampler(backend="reference") on the same U-Net (backend="torch"): the
                              reference update with the noise contract's Philox written in
                              PyTorch (sampling runs only)
  ours                        UNet (fused ops) + Sampler (fused update, in-kernel noise)
  ours + compile              the same with the U-Net's forward through UNet.compiled() (torch.compile,
                              our ops opaque; frozen, pre-packed weights on the CPU)
  ours + CUDA graph           the same with each step captured in a CUDA graph (GPUs only)
The float64-checkable reference U-Net (backend="reference", multi-pass GroupNorm written out)
is for correctness tests only: slower than PyTorch's own ops, it would flatter ours.
Weights are random except the bundled digits model's; timing does not depend on them.
A run of 1000 steps is the full DDPM chain; fewer is DDIM with η = 1 (noise every step, so
the same per-step work) for ours and the reference, and DDPMScheduler.set_timesteps(steps)
for diffusers.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import settings
from ddpm_fast import NoiseSchedule, Sampler, UNet
from ddpm_fast.compiled import CompiledUNet
from ddpm_fast.contract import STEP_COLUMNS
from ddpm_fast.integrations.diffusers import unet_config_to_diffusers

DEVICE = settings.DEVICE
STEP_ROW = 500  # the DDPM row the one-step benchmark repeats: clip on, σ > 0
COMPILED_UNET = "torch.compile U-Net + eager update"
VARIANTS = ("eager", COMPILED_UNET, "torch.compile max-autotune", "diffusers", "reference sampler", "ours",
            "ours + compile", "ours + CUDA graph")
COMPILE_MODES = {"eager": None, "torch.compile": "default", "torch.compile max-autotune": "max-autotune",
                 COMPILED_UNET: None}
LAST = "torch.compile max-autotune"  # its compile takes longest: run after every other variant
BASELINE_BACKEND = "torch"  # the U-Net of every baseline but diffusers: PyTorch's own ops
STEPLESS = ("reference sampler",)  # variants timed as sampling runs only
DIFFUSERS_MISSING = ("diffusers is not installed: `pip install diffusers` (offline GPU machine: "
                     "`make wheels` where pip works, then carry .whl/ along; `make report` installs it)")


@dataclasses.dataclass
class Workload:
    step: Callable[[], None] | None  # one step, in place on the workload's state
    sample: Callable[[int], torch.Tensor]  # a run of `steps` steps from a fresh x_T
    cuda_graph: bool
    # builds what a run of `steps` steps needs (its sampler, its table on the device) before timing
    prepare: Callable[[int], None] = lambda steps: None


def available(variant: str) -> str | None:
    """Why `variant` cannot run here, or None."""
    if variant == "ours + CUDA graph" and not settings.ON_GPU:
        return "CUDA graphs need a GPU"
    if variant == "diffusers":
        try:
            import diffusers  # noqa: F401
        except ImportError:
            return DIFFUSERS_MISSING
    return None


@functools.cache
def flops_per_image(model: str) -> int:
    """Flops of one forward at batch 1 (convolutions, matmuls, attention), counted by torch."""
    net = _base_model(model).eval()
    x = torch.randn(1, net.in_channels, net.resolution, net.resolution)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x, torch.tensor([STEP_ROW]))
    return counter.get_total_flops()


@functools.cache
def build(model: str, config: str, variant: str, batch: int) -> Workload:
    dtype, layout = settings.CONFIGS[config]
    net = _base_model(model)
    shape = (batch, net.in_channels, net.resolution, net.resolution)
    place = dict(device=DEVICE, dtype=dtype, memory_format=layout)
    if variant in COMPILE_MODES:
        net.backend = BASELINE_BACKEND
        net = net.to(**place).eval()
        return _reference_loop(torch.compile(net, dynamic=False) if variant == COMPILED_UNET else net, dtype, shape,
                               COMPILE_MODES[variant])
    if variant == "diffusers":
        return _diffusers(net.config, place, shape)
    net.backend = BASELINE_BACKEND if variant == "reference sampler" else "auto"
    net = net.to(**place).eval()
    if variant == "reference sampler":
        sample, prepare = _sampling(net, dtype, batch, "reference")
        return Workload(None, sample, False, prepare)
    if variant == "ours + compile":
        net = net.compiled()
    return _ours(net, dtype, batch, graph=variant == "ours + CUDA graph")


def _base_model(model: str) -> UNet:
    torch.manual_seed(0)
    return UNet.ddpm_cifar10() if model == "cifar10" else UNet.from_pretrained(model)


@functools.cache  # built once, so no sampling run times the table's construction
def _table(steps: int):
    schedule = NoiseSchedule.linear(1000)
    if steps == schedule.num_timesteps:
        return schedule.step_table("ddpm")
    return schedule.step_table("ddim", steps=steps, eta=1.0)


@functools.cache
def _device_table(steps: int):
    return _table(steps).to(DEVICE)


def _sampler(net: torch.nn.Module, dtype: torch.dtype, steps: int, backend: str, graph: bool) -> Sampler:
    method = dict(method="ddpm") if steps == 1000 else dict(method="ddim", steps=steps, eta=1.0)
    unet = net.model if isinstance(net, CompiledUNet) else net
    return Sampler(net, NoiseSchedule.linear(1000), backend=backend, dtype=dtype, cuda_graph=graph,
                   sample_shape=(unet.in_channels, unet.resolution, unet.resolution), **method)


def update(x: torch.Tensor, out: torch.Tensor, row: torch.Tensor, clip: bool, z: torch.Tensor) -> torch.Tensor:
    """DESIGN §2.3's update as a user writes it: the coefficient row a tensor (one compiled graph
    for every step, no host read), the clip a Python bool (reference/diffusion_step.py reads it
    from the row, a graph break and on a GPU a host sync per step under torch.compile)."""
    A, B, C, D, E, sigma = (row[STEP_COLUMNS.index(name)] for name in ("A", "B", "C", "D", "E", "sigma"))
    x0 = A * x + B * out
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
    return C * x0 + D * x + E * out + sigma * z


def _reference_loop(net: torch.nn.Module, dtype: torch.dtype, shape: tuple, mode: str | None) -> Workload:
    batch = shape[0]
    table = _device_table(1000)
    clip = bool(table.coefs[0, STEP_COLUMNS.index("clip")])  # every row's: the sampler's clip_denoised

    def step(x, t, row):
        return update(x, net(x.to(dtype), t.expand(batch)).to(x.dtype), row, clip, torch.randn_like(x))

    graph = mode == "max-autotune" and settings.ON_GPU  # mode="max-autotune" replays CUDA graphs on GPUs
    # dynamic=False: each workload (model, batch) gets its own static graph, as a user's one model
    # would, where dynamo would otherwise recompile the shared code of `step` and UNet.forward
    # with symbolic sizes once a second workload reached it
    fn = torch.compile(step, mode=mode, fullgraph=True, dynamic=False) if mode else step

    def advance(x, t, row):
        if graph:  # cudagraph trees: a new iteration, whose replay may reuse the last one's output buffer
            torch.compiler.cudagraph_mark_step_begin()
        return fn(x, t, row)

    with torch.inference_mode():  # an inference tensor, like every later x: no recompile on the 2nd step
        state = [torch.randn(shape, device=DEVICE)]

    @torch.inference_mode()
    def one_step():
        state[0] = advance(state[0], table.timesteps[STEP_ROW], table.coefs[STEP_ROW])

    @torch.inference_mode()
    def sample(steps):
        run = _device_table(steps)
        x = torch.randn(shape, device=DEVICE)
        for i in range(len(run)):
            x = advance(x, run.timesteps[i], run.coefs[i])
        return x
    return Workload(one_step, sample, graph, _device_table)


def _diffusers(config: dict, place: dict, shape: tuple) -> Workload:
    import diffusers
    unet = diffusers.UNet2DModel(**unet_config_to_diffusers(config)).to(**place).eval()
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True,
                                        variance_type="fixed_large")

    def advance(x, t):
        return scheduler.step(unet(x, t).sample, t, x).prev_sample

    with torch.inference_mode():
        state = [torch.randn(shape, device=DEVICE, dtype=place["dtype"])]

    @torch.inference_mode()
    def one_step():
        scheduler.set_timesteps(1000)
        state[0] = advance(state[0], scheduler.timesteps[1000 - 1 - STEP_ROW])

    @torch.inference_mode()
    def sample(steps):
        scheduler.set_timesteps(steps)  # what DDPMPipeline does; 1000 is the full chain
        x = torch.randn(shape, device=DEVICE, dtype=place["dtype"])
        for t in scheduler.timesteps:
            x = advance(x, t)
        return x
    return Workload(one_step, sample, False)


def _ours(net: torch.nn.Module, dtype: torch.dtype, batch: int, graph: bool) -> Workload:
    sampler = _sampler(net, dtype, 1000, "auto", graph)
    with torch.inference_mode():
        _, step = sampler.stepper(batch)  # the full DDPM table: far more rows than warm-up + rounds

    @torch.inference_mode()
    def one_step():
        step()
    sample, prepare = _sampling(net, dtype, batch, "auto", graph)
    return Workload(one_step, sample, graph, prepare)


def _sampling(net: torch.nn.Module, dtype: torch.dtype, batch: int, backend: str, graph: bool = False
              ) -> tuple[Callable[[int], torch.Tensor], Callable[[int], None]]:
    """(sample, prepare): prepare(steps) builds the sampler of a run of `steps` steps and uploads
    its table, so that no timed run builds one."""
    samplers = {}

    def prepare(steps):
        if steps not in samplers:
            samplers[steps] = _sampler(net, dtype, steps, backend, graph)
            samplers[steps]._device_table(samplers[steps].device)

    def sample(steps):
        prepare(steps)
        return samplers[steps].sample(batch)
    return sample, prepare


def cases() -> list[tuple[settings.E2E, str, str]]:
    """(workload, config, variant) for every e2e benchmark at the current sizes, max-autotune
    last: a run with a time budget skips it first."""
    sizes = settings.sizes()
    found = [(e2e, config, variant) for e2e in sizes.e2e for config in sizes.e2e_configs
             for variant in (e2e.variants or VARIANTS)]
    return sorted(found, key=lambda case: case[2] == LAST)


def case_id(case) -> str:
    e2e, config, variant = case
    return f"{e2e.model}-{config}-B{e2e.batch}-{variant.replace(' ', '_')}"


def skip_reason(e2e: settings.E2E, variant: str) -> str | None:
    if variant in ("torch.compile max-autotune", COMPILED_UNET) and not e2e.compile:
        return f"--quick leaves out {variant} for {e2e.model}: its compile takes minutes on this machine"
    return available(variant)
