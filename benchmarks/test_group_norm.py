"""The fused GroupNorm + SiLU (with the ResBlock's time-embedding add) against eager PyTorch
(x + add, F.group_norm, F.silu: three passes) and torch.compile of it, at the DDPM CIFAR-10
U-Net's shapes — N = 256 on GPUs, 8 on the CPU — in NCHW and channels_last, float32. Bytes
moved: x read and y written once (the add, weight and bias are negligible).

    pytest benchmarks/test_group_norm.py --benchmark-only
"""
import pytest
import torch
import torch.nn.functional as F

from ddpm_fast.ops import group_norm_silu

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BATCH = 256 if DEVICE.type == "cuda" else 8
SHAPES = [(BATCH, 128, 32, 32), (BATCH, 256, 16, 16), (BATCH, 256, 8, 8), (BATCH, 256, 4, 4)]
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
FUSED = ("triton", "cuda") if DEVICE.type == "cuda" else ("cpu",)
GROUPS = 32


def _setup(shape, layout):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(DEVICE, memory_format=LAYOUTS[layout])
    weight, bias = torch.randn(shape[1], generator=g).to(DEVICE), torch.randn(shape[1], generator=g).to(DEVICE)
    add = torch.randn(shape[:2], generator=g).to(DEVICE)
    return (x, weight, bias, add), 2 * x.numel() * x.element_size()


def _eager(x, weight, bias, add):
    return F.silu(F.group_norm(x + add[:, :, None, None], GROUPS, weight, bias, 1e-6))


def _group(shape, layout):
    return f"group_norm_silu {'x'.join(map(str, shape))} {layout}"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_eager_reference(measure, shape, layout):
    args, nbytes = _setup(shape, layout)
    measure(_group(shape, layout), "eager", lambda: _eager(*args), DEVICE, nbytes)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_compiled_reference(measure, shape, layout):
    args, nbytes = _setup(shape, layout)
    compiled = torch.compile(_eager)
    compiled(*args)  # compile outside the timing
    measure(_group(shape, layout), "torch.compile", lambda: compiled(*args), DEVICE, nbytes)


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fused(measure, shape, layout, impl):
    (x, weight, bias, add), nbytes = _setup(shape, layout)
    run = lambda: group_norm_silu(x, weight, bias, GROUPS, add=add, impl=impl)  # noqa: E731
    measure(_group(shape, layout), f"fused {impl}", run, DEVICE, nbytes)
