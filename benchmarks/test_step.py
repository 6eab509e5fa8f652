"""The fused sampling update against the eager reference update (torch.randn plus the
elementwise update, reference/step.py) and torch.compile of it, at the DDPM CIFAR-10 batch
(256×3×32×32) and, on GPUs, a 64M-element tensor. Bytes moved: x read and written (float32)
and the network output read (its dtype); the noise never touches memory in the fused op.

    pytest benchmarks/test_step.py --benchmark-only
"""
import pytest
import torch

import ddpm_fast as df
from ddpm_fast.ops import diffusion_step_
from ddpm_fast.reference.step import diffusion_step as reference_step

SHAPES = [(256, 3, 32, 32)] + ([(64, 4, 512, 512)] if torch.cuda.is_available() else [])
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FUSED = ("triton", "cuda") if DEVICE.type == "cuda" else ("cpu",)


def _setup(shape):
    table = df.NoiseSchedule.linear(1000).step_table().to(DEVICE)
    x = torch.randn(shape, device=DEVICE)
    out = torch.randn(shape, device=DEVICE)
    index = torch.tensor([500], device=DEVICE)
    return table, x, out, index, 3 * x.numel() * 4


def _eager(table, index):
    row = table.coefs[500]

    def update(x, out):
        return reference_step(x, out, row, torch.randn_like(x))
    return update


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_eager_reference(measure, shape):
    table, x, out, index, nbytes = _setup(shape)
    update = _eager(table, index)
    measure(f"step {shape}", "eager", lambda: update(x, out), DEVICE, nbytes)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_compiled_reference(measure, shape):
    table, x, out, index, nbytes = _setup(shape)
    update = torch.compile(_eager(table, index))
    update(x, out)  # compile outside the timing
    measure(f"step {shape}", "torch.compile", lambda: update(x, out), DEVICE, nbytes)


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fused(measure, shape, impl):
    table, x, out, index, nbytes = _setup(shape)
    run = lambda: diffusion_step_(x, out, table.coefs, table.noise_keys, index, seed=0,  # noqa: E731
                                  impl=impl, check=False)
    measure(f"step {shape}", f"fused {impl}", run, DEVICE, nbytes)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="the copy-bandwidth yardstick is for GPUs")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_copy_bandwidth(measure, shape):
    src = torch.randn(shape, device=DEVICE)
    dst = torch.empty_like(src)
    measure(f"step {shape}", "copy (peak)", lambda: dst.copy_(src), DEVICE, 2 * src.numel() * 4)
