"""The bound's evaluation end to end (DESIGN §2.6) on the bundled digits model: ours — Evaluator,
the U-Net on our fused ops, the noise op and the fused term — against the same bound computed the
usual way, as improved-diffusion's calc_bpd_loop does it: torch.randn_like, the U-Net on PyTorch's
own ops (backend "torch"), the terms unfused and eager (benchmarks/test_vb_terms.py's). One timed
run evaluates STEPS of the T = 1000 timesteps (the strided estimate's, the same for both) for a
batch of digits; a full bound is 1000 such network evaluations an image.

    pytest benchmarks/test_bound.py --benchmark-only [--quick]
"""
import pytest
import torch

import ddpm_fast as df
from benchmarks import settings
from benchmarks.test_vb_terms import _terms
from ddpm_fast.cli.data import digits_dataset
from ddpm_fast.likelihood import Evaluator, strided_timesteps
from ddpm_fast.reference.vb_terms import prior_kl

BATCH, STEPS = (8, 4) if settings.QUICK else (64, 20)
SCHEDULE = df.NoiseSchedule.linear(1000)


def _usual(model, x0):
    timesteps, weights = strided_timesteps(SCHEDULE.num_timesteps, STEPS)
    terms = {t: _terms(t) for t in timesteps}

    @torch.inference_mode()
    def bound():
        total = prior_kl(SCHEDULE, x0.double())
        for t, weight in zip(timesteps, weights):
            eps = torch.randn_like(x0)
            x_t = float(SCHEDULE.sqrt_alphas_cumprod[t]) * x0 + float(SCHEDULE.sqrt_one_minus_alphas_cumprod[t]) * eps
            out = model(x_t, torch.full((x0.shape[0],), t, dtype=torch.int64, device=x0.device))
            total = total + weight * terms[t](x0, eps, out)[:, 0].double().cpu()
        return total
    return bound


@pytest.mark.parametrize("variant", ["eager", "ours"])
def test_bound(measure, variant):
    model = df.UNet.from_pretrained("digits").to(settings.DEVICE).eval()
    x0 = (torch.round((digits_dataset()[:BATCH] + 1) * 127.5) / 127.5 - 1).to(settings.DEVICE)
    if variant == "eager":
        model.backend = "torch"
        run = _usual(model, x0)
    else:
        evaluator = Evaluator(model, SCHEDULE)

        def run():
            return evaluator.bits_per_dim(x0, timesteps=STEPS).bpd
    run()  # warm-up outside the timing
    measure(f"e2e bound digits B={BATCH} evaluations={STEPS}", variant, run, rounds=settings.sizes().sample_rounds,
            warmup=0, images=BATCH, kind="e2e-bound", model="digits", batch=BATCH, steps=STEPS)
