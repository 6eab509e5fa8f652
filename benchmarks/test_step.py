"""The fused sampling update against the eager reference update (torch.randn plus the
elementwise update, reference/diffusion_step.py) and torch.compile of it, at the DDPM CIFAR-10 batch
(256×3×32×32) and, on GPUs, a 64M-element tensor. Bytes moved: x read and written (float32)
and the network output read (its dtype); the noise never touches memory in the fused op.

    pytest benchmarks/test_step.py --benchmark-only [--quick]
"""
import pytest
import torch

import ddpm_fast as df
from benchmarks import settings
from benchmarks.rotation import rotate
from ddpm_fast.ops import diffusion_step_
from ddpm_fast.reference.diffusion_step import diffusion_step as reference_step

SIZES = settings.sizes()
DEVICE = settings.DEVICE
FUSED = ("triton", "cuda") if settings.ON_GPU else ("cpu",)
ROW = 500  # a mid-schedule DDPM row: clip on, σ > 0


def _setup(shape):
    table = df.NoiseSchedule.linear(1000).step_table().to(DEVICE)
    nbytes = 3 * torch.Size(shape).numel() * 4
    next_set, sets = rotate(lambda i: (torch.randn(shape, device=DEVICE), torch.randn(shape, device=DEVICE)), nbytes)
    return table, next_set, dict(bytes_moved=nbytes, images=shape[0], input_sets=sets, kind="op", dtype="float32")


def _update(table):
    row = table.coefs[ROW]

    def update(x, out):
        return reference_step(x, out, row, torch.randn_like(x))
    return update


def _group(shape):
    return f"step {'x'.join(map(str, shape))} float32"


@pytest.mark.parametrize("shape", SIZES.step_shapes, ids=lambda s: "x".join(map(str, s)))
def test_eager_reference(measure, shape):
    table, next_set, work = _setup(shape)
    update = _update(table)
    measure(_group(shape), "eager", lambda: update(*next_set()), **work)


@pytest.mark.parametrize("shape", SIZES.step_shapes, ids=lambda s: "x".join(map(str, s)))
def test_compiled_reference(measure, shape):
    table, next_set, work = _setup(shape)
    update = torch.compile(_update(table))
    update(*next_set())  # compile outside the timing
    measure(_group(shape), "torch.compile", lambda: update(*next_set()), **work)


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("shape", SIZES.step_shapes, ids=lambda s: "x".join(map(str, s)))
def test_fused(measure, shape, impl):
    table, next_set, work = _setup(shape)
    index = torch.tensor([ROW], device=DEVICE)

    def run():
        x, out = next_set()
        diffusion_step_(x, out, table.coefs, table.noise_keys, index, seed=0, impl=impl, check=False)
    measure(_group(shape), f"fused {impl}", run, **work)
