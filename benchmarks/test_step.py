"""The fused sampling update against the update as a user writes it (workloads.update: torch.randn
plus the elementwise update, the clip a Python bool) run eagerly and through
torch.compile(fullgraph=True), at the DDPM CIFAR-10 batch (256×3×32×32) and, on GPUs, a
64M-element tensor. "torch.compile, z given" is the compiled update fed pre-drawn noise: it
separates what fusion gains from what drawing the noise costs. Bytes moved: x read and written
(float32) and the network output read (its dtype); the noise never touches memory in the fused op.

    pytest benchmarks/test_step.py --benchmark-only [--quick]
"""
import pytest
import torch

import ddpm_fast as df
from benchmarks import settings
from benchmarks.rotation import rotate
from benchmarks.workloads import update
from ddpm_fast.contract import STEP_COLUMNS
from ddpm_fast.ops import diffusion_step_

SIZES = settings.sizes()
DEVICE = settings.DEVICE
FUSED = ("triton", "cuda") if settings.ON_GPU else ("cpu",)
ROW = 500  # a mid-schedule DDPM row: clip on, σ > 0


def _setup(shape):
    table = df.NoiseSchedule.linear(1000).step_table().to(DEVICE)
    nbytes = 3 * torch.Size(shape).numel() * 4
    next_set, sets = rotate(lambda i: tuple(torch.randn(shape, device=DEVICE) for _ in range(3)), nbytes)
    return table, next_set, dict(bytes_moved=nbytes, images=shape[0], input_sets=sets, kind="op", dtype="float32")


def _update(table, z_given=False):
    row, clip = table.coefs[ROW], bool(table.coefs[ROW, STEP_COLUMNS.index("clip")])

    def step(x, out, z):
        return update(x, out, row, clip, z if z_given else torch.randn_like(x))
    return step


def _group(shape):
    return f"step {'x'.join(map(str, shape))} float32"


@pytest.mark.parametrize("shape", SIZES.step_shapes, ids=lambda s: "x".join(map(str, s)))
def test_eager_reference(measure, shape):
    table, next_set, work = _setup(shape)
    step = _update(table)
    measure(_group(shape), "eager", lambda: step(*next_set()), **work)


@pytest.mark.parametrize("z_given", [False, True], ids=["randn", "z_given"])
@pytest.mark.parametrize("shape", SIZES.step_shapes, ids=lambda s: "x".join(map(str, s)))
def test_compiled_reference(measure, shape, z_given):
    table, next_set, work = _setup(shape)
    step = torch.compile(_update(table, z_given), fullgraph=True)
    step(*next_set())  # compile outside the timing
    measure(_group(shape), "torch.compile, z given" if z_given else "torch.compile", lambda: step(*next_set()), **work)


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("shape", SIZES.step_shapes, ids=lambda s: "x".join(map(str, s)))
def test_fused(measure, shape, impl):
    table, next_set, work = _setup(shape)
    index = torch.tensor([ROW], device=DEVICE)

    def run():
        x, out, _ = next_set()
        diffusion_step_(x, out, table.coefs, table.noise_keys, index, seed=0, impl=impl, check=False)
    measure(_group(shape), f"fused {impl}", run, **work)
