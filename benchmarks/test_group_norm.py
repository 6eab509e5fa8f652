"""The fused GroupNorm + SiLU (with the ResBlock's time-embedding add) against eager PyTorch
(x + add, F.group_norm, F.silu: three passes) and torch.compile of it, at the DDPM CIFAR-10
U-Net's shapes — N = 256 on GPUs (64 and 256 in make gpu-check, float32 and bfloat16 there),
8 on the CPU — in NCHW and channels_last, float32. Bytes moved: x read and y written once (the
add, weight and bias are negligible).

    pytest benchmarks/test_group_norm.py --benchmark-only [--quick]
"""
import pytest
import torch
import torch.nn.functional as F

from benchmarks import settings
from benchmarks.rotation import rotate
from ddpm_fast.ops import group_norm_silu

SIZES = settings.sizes()
DEVICE = settings.DEVICE
SHAPES = [(batch, *chw) for batch in SIZES.gn_batches for chw in SIZES.gn_shapes]
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
FUSED = ("triton", "cuda") if settings.ON_GPU else ("cpu",)
GROUPS = 32


def _setup(shape, layout, dtype):
    def make(i):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(shape, generator=g).to(DEVICE, dtype, memory_format=LAYOUTS[layout])
        weight, bias = (torch.randn(shape[1], generator=g).to(DEVICE, dtype) for _ in range(2))
        return x, weight, bias, torch.randn(shape[:2], generator=g).to(DEVICE, dtype)
    nbytes = 2 * torch.Size(shape).numel() * dtype.itemsize
    next_set, sets = rotate(make, nbytes)
    return next_set, dict(bytes_moved=nbytes, input_sets=sets, kind="op", dtype=str(dtype)[6:])


def _eager(x, weight, bias, add):
    return F.silu(F.group_norm(x + add[:, :, None, None], GROUPS, weight, bias, 1e-6))


def _group(shape, layout, dtype):
    return f"group_norm_silu {'x'.join(map(str, shape))} {layout} {str(dtype)[6:]}"


@pytest.mark.parametrize("dtype", SIZES.gn_dtypes, ids=str)
@pytest.mark.parametrize("layout", SIZES.gn_layouts)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_eager_reference(measure, shape, layout, dtype):
    next_set, work = _setup(shape, layout, dtype)
    measure(_group(shape, layout, dtype), "eager", lambda: _eager(*next_set()), **work)


@pytest.mark.parametrize("dtype", SIZES.gn_dtypes, ids=str)
@pytest.mark.parametrize("layout", SIZES.gn_layouts)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_compiled_reference(measure, shape, layout, dtype):
    next_set, work = _setup(shape, layout, dtype)
    compiled = torch.compile(_eager)
    compiled(*next_set())  # compile outside the timing
    measure(_group(shape, layout, dtype), "torch.compile", lambda: compiled(*next_set()), **work)


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("dtype", SIZES.gn_dtypes, ids=str)
@pytest.mark.parametrize("layout", SIZES.gn_layouts)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fused(measure, shape, layout, dtype, impl):
    next_set, work = _setup(shape, layout, dtype)

    def run():
        x, weight, bias, add = next_set()
        group_norm_silu(x, weight, bias, GROUPS, add=add, impl=impl)
    measure(_group(shape, layout, dtype), f"fused {impl}", run, **work)
