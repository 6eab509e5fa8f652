"""The fused sampling update against the update as a user writes it (workloads.update: torch.randn
plus the elementwise update, the clip a Python bool) run eagerly and through
torch.compile(fullgraph=True), at the DDPM CIFAR-10 batch (256×3×32×32) and, on GPUs, a
64M-element tensor. "torch.compile, z given" is the compiled update fed pre-drawn noise: it
separates what fusion gains from what drawing the noise costs. Bytes moved: x read and written
(float32) and the network output read (its dtype); the noise never touches memory in the fused op.
The guided update (DESIGN §2.5, w = 2, s = 1) also reads the unconditional half of the output and
a classifier's gradient; a user writes the combination (1 + w)·out − w·uncond before the update
and the mean shift Gmean·g after it.

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
GUIDANCE = {False: {}, True: dict(guidance_scale=2.0, classifier_scale=1.0)}  # guided: w and s
_W, _GOUT, _GMEAN = (STEP_COLUMNS.index(name) for name in ("w", "Gout", "Gmean"))
SHAPES = pytest.mark.parametrize("shape", SIZES.step_shapes, ids=lambda s: "x".join(map(str, s)))
GUIDED = pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])


def _setup(shape, guided):
    # inputs (x, out, z) and, guided, (uncond, grad); every one but z is read by the fused op
    table = df.NoiseSchedule.linear(1000).step_table(**GUIDANCE[guided]).to(DEVICE)
    tensors = 5 if guided else 3
    nbytes = tensors * torch.Size(shape).numel() * 4
    next_set, sets = rotate(lambda i: tuple(torch.randn(shape, device=DEVICE) for _ in range(tensors)), nbytes)
    return table, next_set, dict(bytes_moved=nbytes, images=shape[0], input_sets=sets, kind="op", dtype="float32")


def _update(table, z_given=False):
    row, clip = table.coefs[ROW], bool(table.coefs[ROW, STEP_COLUMNS.index("clip")])
    assert row[_GOUT] == 0  # a DDPM row: classifier guidance moves the mean (Gmean), not the output

    def step(x, out, z, *guidance):
        z = z if z_given else torch.randn_like(x)
        if not guidance:
            return update(x, out, row, clip, z)
        uncond, grad = guidance
        return update(x, (1 + row[_W]) * out - row[_W] * uncond, row, clip, z) + row[_GMEAN] * grad
    return step


def _group(shape, guided):
    return f"{'guided ' * guided}step {'x'.join(map(str, shape))} float32"


@GUIDED
@SHAPES
def test_eager_reference(measure, shape, guided):
    table, next_set, work = _setup(shape, guided)
    step = _update(table)
    measure(_group(shape, guided), "eager", lambda: step(*next_set()), **work)


@pytest.mark.parametrize("z_given", [False, True], ids=["randn", "z_given"])
@GUIDED
@SHAPES
def test_compiled_reference(measure, shape, guided, z_given):
    table, next_set, work = _setup(shape, guided)
    step = torch.compile(_update(table, z_given), fullgraph=True)
    step(*next_set())  # compile outside the timing
    measure(_group(shape, guided), "torch.compile, z given" if z_given else "torch.compile",
            lambda: step(*next_set()), **work)


@pytest.mark.parametrize("impl", FUSED)
@GUIDED
@SHAPES
def test_fused(measure, shape, guided, impl):
    table, next_set, work = _setup(shape, guided)
    index = torch.tensor([ROW], device=DEVICE)

    def run():
        x, out, _, *guidance = next_set()
        uncond, grad = guidance if guided else (None, None)
        diffusion_step_(x, out, table.coefs, table.noise_keys, index, seed=0, uncond_output=uncond,
                        guidance_grad=grad, impl=impl, check=False)
    measure(_group(shape, guided), f"fused {impl}", run, **work)
