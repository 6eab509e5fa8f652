"""The bound's fused per-timestep term (ops.vb_terms, DESIGN §5.7) against the same terms as a user
writes them in PyTorch (improved-diffusion's _vb_terms_bpd: x_t, x̂_0 clipped, both posterior
means, the Gaussian KL or the decoder's CDF difference, the two squared errors), eager and through
torch.compile(fullgraph=True), at the CIFAR-10 batch (256×3×32×32) and the digits evaluation batch
(64×1×16×16): a KL row (t = 500, 999 of a bound's 1000 rows) and the decoder row (t = 0). Bytes
moved: x_0, ε and the network output read once (float32); the result is [B, 3].

    pytest benchmarks/test_vb_terms.py --benchmark-only [--quick]
"""
import math

import pytest
import torch

import ddpm_fast as df
from benchmarks import settings
from benchmarks.rotation import rotate
from ddpm_fast.likelihood import term_table
from ddpm_fast.ops import vb_terms

SIZES = settings.sizes()
DEVICE = settings.DEVICE
FUSED = ("triton", "cuda") if settings.ON_GPU else ("cpu",)
SHAPES = pytest.mark.parametrize("shape", (*SIZES.step_shapes, (64, 1, 16, 16)), ids=lambda s: "x".join(map(str, s)))
ROWS = pytest.mark.parametrize("t", [500, 0], ids=["kl", "decoder"])
SCHEDULE = df.NoiseSchedule.linear(1000)


def _setup(shape, t):
    def inputs(i):
        g = torch.Generator(device=DEVICE).manual_seed(i)
        x0 = torch.randint(0, 256, shape, generator=g, device=DEVICE).float() / 127.5 - 1
        eps = torch.randn(shape, generator=g, device=DEVICE)
        return x0, eps, eps + 0.1 * torch.randn(shape, generator=g, device=DEVICE)
    nbytes = 3 * torch.Size(shape).numel() * 4
    next_set, sets = rotate(inputs, nbytes)
    return next_set, dict(bytes_moved=nbytes, images=shape[0], input_sets=sets, kind="op", dtype="float32")


def _terms(t):
    """The terms as a user writes them, the schedule's numbers as Python floats."""
    s = SCHEDULE
    sa, s1a = float(s.sqrt_alphas_cumprod[t]), float(s.sqrt_one_minus_alphas_cumprod[t])
    c1, c2 = float(s.posterior_mean_coef1[t]), float(s.posterior_mean_coef2[t])
    var = float(s.betas[t])
    log_true = math.log(float(s.posterior_variance[max(t, 1)]))

    def terms(x0, eps, out):
        x_t = sa * x0 + s1a * eps
        pred = ((x_t - s1a * out) / sa).clamp(-1, 1)
        model_mean = c1 * pred + c2 * x_t
        if t == 0:  # eq. 13's bins, the edges to ±∞
            hi = torch.where(x0 > 0.999, torch.inf, (x0 + 1 / 255 - model_mean) / math.sqrt(var))
            lo = torch.where(x0 < -0.999, -torch.inf, (x0 - 1 / 255 - model_mean) / math.sqrt(var))
            term = -torch.log((torch.special.ndtr(hi) - torch.special.ndtr(lo)).clamp_min(1e-12))
        else:
            true_mean = c1 * x0 + c2 * x_t
            term = 0.5 * (-1 + math.log(var) - log_true + math.exp(log_true - math.log(var))
                          + (true_mean - model_mean) ** 2 / var)
        return torch.stack([term.flatten(1).sum(1), ((x0 - pred) ** 2).flatten(1).sum(1),
                            ((out - eps) ** 2).flatten(1).sum(1)], dim=1)
    return terms


def _group(shape, t):
    return f"vb_terms {'decoder' if t == 0 else 'KL'} {'x'.join(map(str, shape))} float32"


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compile"])
@ROWS
@SHAPES
def test_unfused_terms(measure, shape, t, compiled):
    next_set, work = _setup(shape, t)
    terms = torch.compile(_terms(t), fullgraph=True) if compiled else _terms(t)
    terms(*next_set())  # compile outside the timing
    measure(_group(shape, t), "torch.compile" if compiled else "eager", lambda: terms(*next_set()), **work)


@pytest.mark.parametrize("impl", FUSED)
@ROWS
@SHAPES
def test_fused(measure, shape, t, impl):
    next_set, work = _setup(shape, t)
    row = term_table(SCHEDULE)[t].to(DEVICE)
    measure(_group(shape, t), f"fused {impl}", lambda: vb_terms(*next_set(), row, impl=impl), **work)
