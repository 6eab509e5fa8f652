"""The reference diffusion maths (ddpm_fast.reference.diffusion) against the paper's identities."""
import math

import pytest
import torch

from ddpm_fast import NoiseSchedule
from ddpm_fast.reference import diffusion as D

T = 1000


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.linear(T)


def _batch(seed, shape=(6, 3, 4, 5), t=None, T=T):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    eps = torch.randn(shape, generator=g, dtype=torch.float64)
    z = torch.randn(shape, generator=g, dtype=torch.float64)
    if t is None:
        t = torch.randint(0, T, (shape[0],), generator=g)
        t[0], t[-1] = 0, T - 1
    return x, eps, z, t


def test_forward_process_closed_form_matches_iterated_steps(schedule):
    # Iterate q(x_t | x_{t-1}) = N(√α_t x_{t-1}, β_t I) and compare the empirical moments with
    # eq. 4's q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I) at several t (5 standard errors).
    g = torch.Generator().manual_seed(0)
    n = 20000
    x0 = torch.tensor([-1.0, -0.3, 0.5, 1.0], dtype=torch.float64).repeat(n, 1)
    x = x0.clone()
    checked = 0
    for i in range(T):
        x = schedule.alphas[i].sqrt() * x + schedule.betas[i].sqrt() * torch.randn(x.shape, generator=g, dtype=torch.float64)
        if i in (0, 9, 99, 499, 999):
            t = torch.full((n,), i)
            closed = D.q_sample(schedule, x0, t, torch.randn(x.shape, generator=g, dtype=torch.float64))
            mean, var = schedule.sqrt_alphas_cumprod[i] * x0[0], 1 - schedule.alphas_cumprod[i]
            for sample in (x, closed):
                assert ((sample.mean(0) - mean).abs() < 5 * (var / n) ** 0.5).all(), i
                assert ((sample.var(0) - var).abs() < 5 * var * (2 / n) ** 0.5).all(), i
            checked += 1
    assert checked == 5


def test_q_sample_is_eq4(schedule):
    x, eps, _, t = _batch(1)
    expected = schedule.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1) * x + (1 - schedule.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1) * eps
    assert torch.allclose(D.q_sample(schedule, x, t, eps), expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("prediction_type", D.PREDICTION_TYPES)
def test_predictions_recover_x0_and_eps(schedule, prediction_type):
    x0, eps, _, t = _batch(2)
    x_t = D.q_sample(schedule, x0, t, eps)
    ab = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    output = {"epsilon": eps, "x0": x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[prediction_type]
    pred_x0, pred_eps = D.predict_start_and_noise(schedule, output, x_t, t, prediction_type)
    assert torch.allclose(pred_x0, x0, atol=1e-9) and torch.allclose(pred_eps, eps, atol=1e-9)


def test_posterior_is_the_gaussian_product(schedule):
    # μ̃_t(x_t, x_0) of eq. 7 is the mean of q(x_{t−1}|x_0)·q(x_t|x_{t−1}) normalised: check it
    # against the precision-weighted combination of the two Gaussians.
    x0, eps, _, t = _batch(3)
    t = t.clamp_min(1)
    x_t = D.q_sample(schedule, x0, t, eps)
    mean, var = D.q_posterior_mean_variance(schedule, x0, x_t, t)
    col = lambda v: v[t].view(-1, 1, 1, 1)  # noqa: E731
    prior_mean, prior_var = col(schedule.alphas_cumprod_prev).sqrt() * x0, 1 - col(schedule.alphas_cumprod_prev)
    like_scale, like_var = col(schedule.alphas).sqrt(), col(schedule.betas)
    post_var = 1 / (1 / prior_var + like_scale ** 2 / like_var)
    assert torch.allclose(var, post_var, rtol=1e-10)
    assert torch.allclose(mean, post_var * (prior_mean / prior_var + like_scale * x_t / like_var), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("variance", D.VARIANCES)
def test_posterior_mean_form_equals_algorithm2_without_clipping(schedule, variance):
    x, eps, z, t = _batch(4)
    a = D.p_sample(schedule, eps, x, t, z, clip_denoised=False, variance=variance)
    b = D.p_sample_algorithm2(schedule, eps, x, t, z, variance=variance)
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_no_noise_on_the_last_step(schedule):
    x, eps, z, _ = _batch(5)
    t = torch.zeros(x.shape[0], dtype=torch.int64)
    for variance in D.VARIANCES:
        with_z = D.p_sample(schedule, eps, x, t, z, variance=variance)
        assert torch.equal(with_z, D.p_sample(schedule, eps, x, t, None, variance=variance))
    # and at t = 0 the clipped mean is x̂_0 itself
    x0_hat = D.predict_start_from_noise(schedule, x, t, eps).clamp(-1, 1)
    assert torch.allclose(with_z, x0_hat, atol=1e-12)


@pytest.mark.parametrize("clip", [False, True])
def test_ddim_eta1_over_all_steps_is_ddpm_fixed_small(schedule, clip):
    # DESIGN §2's anchor identity (with the re-derived ε when clipping).
    x, eps, z, t = _batch(6)
    ddim = D.ddim_step(schedule, eps, x, t, t - 1, z, eta=1.0, clip_denoised=clip)
    ddpm = D.p_sample(schedule, eps, x, t, z, clip_denoised=clip, variance="fixed_small")
    assert torch.allclose(ddim, ddpm, rtol=1e-10, atol=1e-12)


def test_ddim_eta0_is_deterministic_and_reconstructs(schedule):
    # With the true ε and η = 0, DDIM jumps exactly along q: x_s = √ᾱ_s x_0 + √(1−ᾱ_s) ε.
    x0, eps, z, _ = _batch(7)
    t, s = torch.full((6,), 700), torch.full((6,), 300)
    x_t = D.q_sample(schedule, x0, t, eps)
    x_s = D.ddim_step(schedule, eps, x_t, t, s, z, eta=0.0, clip_denoised=False)
    assert torch.allclose(x_s, D.q_sample(schedule, x0, s, eps), atol=1e-10)
    last = D.ddim_step(schedule, eps, x_t, t, torch.full((6,), -1), None, eta=0.0, clip_denoised=False)
    assert torch.allclose(last, x0, atol=1e-9)


def test_ddim_sigma(schedule):
    t, s = torch.tensor([500]), torch.tensor([250])
    ab_t, ab_s = schedule.alphas_cumprod[500].item(), schedule.alphas_cumprod[250].item()
    sigma = D.ddim_sigma(schedule, t, s, 0.5, torch.zeros(1, dtype=torch.float64)).item()
    assert sigma == pytest.approx(0.5 * math.sqrt((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)), rel=1e-12)


def test_float32_inputs_compute_in_float32(schedule):
    x, eps, z, t = (v.float() if v.is_floating_point() else v for v in _batch(8))
    out = D.p_sample(schedule, eps, x, t, z)
    assert out.dtype == torch.float32
    ref = D.p_sample(schedule, eps.double(), x.double(), t, z.double())
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-6)


def test_training_losses_l_simple(schedule):
    x0, eps, _, t = _batch(9)
    oracle = lambda x_t, tt: D.predict_noise_from_start(schedule, x_t, tt, x0)  # noqa: E731  knows x_0
    assert torch.allclose(D.training_losses(oracle, schedule, x0, t, eps), torch.zeros(6, dtype=torch.float64), atol=1e-18)
    zero = lambda x_t, tt: torch.zeros_like(x_t)  # noqa: E731
    assert torch.allclose(D.training_losses(zero, schedule, x0, t, eps), (eps ** 2).flatten(1).mean(1))


def test_bad_inputs(schedule):
    x, eps, z, t = _batch(10)
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        D.p_sample(schedule, eps, x, torch.full_like(t, 1000), z)
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        D.q_sample(schedule, x, torch.full_like(t, -1), eps)
    with pytest.raises(TypeError, match="integer"):
        D.q_sample(schedule, x, t.double(), eps)
    with pytest.raises(ValueError, match="shape"):
        D.q_sample(schedule, x, t[:2], eps)
    with pytest.raises(ValueError, match="shape"):
        D.p_sample(schedule, eps[:, :2], x, t, z)
    with pytest.raises(ValueError, match="variance"):
        D.p_sample(schedule, eps, x, t, z, variance="learned")
    with pytest.raises(ValueError, match="prediction_type"):
        D.p_sample(schedule, eps, x, t, z, prediction_type="score")
    with pytest.raises(ValueError, match="noise is required"):
        D.p_sample(schedule, eps, x, t, None)
    with pytest.raises(ValueError, match="noise must have"):
        D.p_sample(schedule, eps, x, t, z[:, :1])
    for eta in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="eta"):
            D.ddim_step(schedule, eps, x, t, t - 1, z, eta=eta)
    with pytest.raises(ValueError, match="t_prev"):
        D.ddim_step(schedule, eps, x, t, t, z, eta=0.0)
