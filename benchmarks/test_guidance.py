"""The guided update (DESIGN §2.5): classifier-free guidance and a classifier gradient inside the
fused step, against what a user writes instead — the combination (1 + w)·ε(x, y) − w·ε(x, ∅),
the classifier's ε-shift, then the update with torch.randn, eagerly and through torch.compile —
on a DDIM row at the DDPM CIFAR-10 batch. Bytes moved: x read and written, both halves of the
network output and the gradient read (float32); the noise never touches memory in the fused op.

    pytest benchmarks/test_guidance.py --benchmark-only [--quick]
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
ROW = 25  # a mid-run row of DDIM 50 with w = 2 and s = 1


def _setup(shape):
    table = df.NoiseSchedule.linear(1000).step_table("ddim", steps=50, guidance_scale=2.0,
                                                     classifier_scale=1.0).to(DEVICE)
    nbytes = 5 * torch.Size(shape).numel() * 4
    next_set, sets = rotate(lambda i: tuple(torch.randn(shape, device=DEVICE) for _ in range(4)), nbytes)
    return table, next_set, dict(bytes_moved=nbytes, images=shape[0], input_sets=sets, kind="op", dtype="float32")


def _update(table):
    row = table.coefs[ROW]

    def update(x, cond, uncond, grad):
        return reference_step(x, cond, row, torch.randn_like(x), None, uncond, grad)
    return update


def _group(shape):
    return f"guided step {'x'.join(map(str, shape))} float32"


@pytest.mark.parametrize("shape", SIZES.step_shapes, ids=lambda s: "x".join(map(str, s)))
def test_eager_guided_update(measure, shape):
    table, next_set, work = _setup(shape)
    update = _update(table)
    measure(_group(shape), "eager", lambda: update(*next_set()), **work)


@pytest.mark.parametrize("shape", SIZES.step_shapes, ids=lambda s: "x".join(map(str, s)))
def test_compiled_guided_update(measure, shape):
    table, next_set, work = _setup(shape)
    update = torch.compile(_update(table))
    update(*next_set())  # compile outside the timing
    measure(_group(shape), "torch.compile", lambda: update(*next_set()), **work)


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("shape", SIZES.step_shapes, ids=lambda s: "x".join(map(str, s)))
def test_fused_guided_update(measure, shape, impl):
    table, next_set, work = _setup(shape)
    index = torch.tensor([ROW], device=DEVICE)

    def run():
        x, cond, uncond, grad = next_set()
        diffusion_step_(x, cond, table.coefs, table.noise_keys, index, seed=0, uncond_output=uncond,
                        guidance_grad=grad, impl=impl, check=False)
    measure(_group(shape), f"fused {impl}", run, **work)
