"""The bound in bits/dim (ddpm_fast.likelihood.Evaluator, DESIGN §2.6): the closed forms an oracle
network gives, the noise contract (an image's bound whatever its batch), an untrained network
much worse than the bundled one, class-conditional models, and bad inputs."""
import math

import pytest
import torch

import ddpm_fast as df
from ddpm_fast.cli.data import digits_dataset, digits_labels
from ddpm_fast.contract import NLL_NOISE_KEY_BASE
from ddpm_fast.likelihood import Evaluator, strided_timesteps

T = 20


@pytest.fixture(scope="module")
def schedule():
    return df.NoiseSchedule.linear(T)


def _images(n=3, shape=(1, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(0, 256, (n, *shape), generator=g)
    k[:, :, 0] = 0  # edge bins on both sides
    k[:, :, 1] = 255
    return k.float() / 127.5 - 1


def _oracle(schedule, x0):
    """A network that returns the very ε that made x_t from x0 (recovered from x_t in float64)."""
    def model(x_t, t):
        a = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        return ((x_t.double() - a.sqrt() * x0.double()) / (1 - a).sqrt()).float()
    return model


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("sigma1", ["paper", "improved-diffusion"])
def test_oracle_gives_the_closed_forms(schedule, backend, sigma1):
    x0 = _images()
    D, ln2 = x0[0].numel(), math.log(2)
    for variance in ("fixed_large", "fixed_small"):
        bound = Evaluator(_oracle(schedule, x0), schedule, variance=variance, sigma1=sigma1, backend=backend,
                          sample_shape=(1, 4, 4)).bits_per_dim(x0, seed=3)
        kl = bound.terms[:, bound.timesteps > 0]
        betas, tilde = schedule.betas[1:].flip(0), schedule.posterior_variance[1:].flip(0)
        if variance == "fixed_small":  # q's posterior is p_θ's: every L_{t−1} is 0
            assert float(kl.abs().max()) < 1e-9
        else:  # the variance mismatch ½(log(β/β̃) + β̃/β − 1) a dimension
            expected = 0.5 * (torch.log(betas / tilde) + tilde / betas - 1) / ln2
            assert torch.allclose(kl, expected.expand_as(kl), rtol=1e-6, atol=0)
        # L_0: the bin mass of N(x_0, σ_1²) around x_0, the edge bins to ±∞
        sigma1_sq = float(schedule.betas[0]) if (variance, sigma1) == ("fixed_large", "paper") else \
            float(schedule.posterior_variance[1])
        half = torch.tensor((1 / 255) / math.sqrt(sigma1_sq), dtype=torch.float64)
        edge = (x0.abs() > 0.999).double().flatten(1)
        mass = torch.where(edge > 0, torch.special.ndtr(half), 2 * torch.special.ndtr(half) - 1)
        expected = -torch.log(mass).sum(1) / (D * ln2)
        assert torch.allclose(bound.decoder, expected, rtol=1e-6, atol=0)
        # L_T = KL(N(√ᾱ_T x_0, 1 − ᾱ_T) ‖ N(0, 1))
        a = schedule.alphas_cumprod[-1]
        prior = 0.5 * (a * x0.double() ** 2 + (1 - a) - 1 - torch.log(1 - a)).flatten(1).sum(1) / (D * ln2)
        assert torch.allclose(bound.prior, prior, rtol=1e-12, atol=0)
        assert torch.allclose(bound.bpd, bound.prior + bound.terms.sum(1), rtol=1e-12)


def test_an_image_has_the_same_bound_in_any_batch(schedule):
    x0 = _images(5)
    evaluator = Evaluator(lambda x, t: 0.7 * x, schedule, sample_shape=(1, 4, 4))
    whole = evaluator.bits_per_dim(x0, seed=9, batch_size=5)
    assert torch.equal(evaluator.bits_per_dim(x0, seed=9, batch_size=2).terms, whole.terms)
    alone = evaluator.bits_per_dim(x0[3:4], seed=9, sample_offset=3)
    assert torch.equal(alone.terms, whole.terms[3:4])
    assert not torch.equal(evaluator.bits_per_dim(x0, seed=10).terms, whole.terms)


def test_noise_is_the_documented_stream(schedule):
    """x_t at timestep t is √ᾱ_t x_0 + √(1−ᾱ_t)·randn(step=2^31 + t) of the image's global index."""
    x0, seen = _images(2), {}

    def model(x_t, t):
        seen[int(t[0])] = x_t.clone()
        return torch.zeros_like(x_t)
    Evaluator(model, schedule, sample_shape=(1, 4, 4)).bits_per_dim(x0, seed=4, sample_offset=7)
    for t in (0, 5, T - 1):
        eps = df.randn(x0.shape, seed=4, step=NLL_NOISE_KEY_BASE + t, sample_offset=7)
        a = float(schedule.alphas_cumprod[t])
        assert torch.equal(seen[t], math.sqrt(a) * x0 + math.sqrt(1 - a) * eps)


def test_strided_estimate_is_labelled_and_weighted(schedule):
    for count in (2, 3, 5, T - 1):
        steps, weights = strided_timesteps(T, count)
        assert steps[-1] == 0 and steps == sorted(set(steps), reverse=True) and len(steps) == count
        assert sum(weights[:-1]) == pytest.approx(T - 1) and weights[-1] == 1
    bound = Evaluator(lambda x, t: 0.5 * x, schedule, sample_shape=(1, 4, 4)).bits_per_dim(_images(), timesteps=5)
    assert bound.estimate and bound.terms.shape == (3, 5) and bound.summary()["estimate"]
    with pytest.raises(ValueError, match="2 <= K <= T"):
        strided_timesteps(T, 1)


def test_off_grid_images_are_quantised_and_counted(schedule):
    x0 = _images(3)
    evaluator = Evaluator(lambda x, t: 0.5 * x, schedule, sample_shape=(1, 4, 4))
    on_grid = evaluator.bits_per_dim(x0, timesteps=3)
    nudged = x0.clone()
    nudged[1, 0, 2, 2] += 0.3 / 255 * (1 if nudged[1, 0, 2, 2] < 0 else -1)
    moved = evaluator.bits_per_dim(nudged, timesteps=3)
    assert on_grid.quantised == 0 and moved.quantised == 1
    assert torch.equal(moved.terms, on_grid.terms)


def test_untrained_network_is_much_worse():
    schedule = df.NoiseSchedule.linear(1000)
    x0 = digits_dataset()[:4]
    trained = Evaluator(df.UNet.from_pretrained("digits"), schedule).bits_per_dim(x0, timesteps=8)
    torch.manual_seed(0)
    untrained = Evaluator(df.UNet.digits(), schedule).bits_per_dim(x0, timesteps=8)
    assert float(untrained.bpd.mean()) > 3 * float(trained.bpd.mean())


def test_conditional_model_given_the_label_and_none():
    schedule = df.NoiseSchedule.linear(1000)
    x0, y = digits_dataset()[:2], digits_labels()[:2]
    evaluator = Evaluator(df.UNet.from_pretrained("digits-cond"), schedule)
    given = evaluator.bits_per_dim(x0, labels=y, timesteps=4)
    none = evaluator.bits_per_dim(x0, labels=10, timesteps=4)
    assert torch.isfinite(given.bpd).all() and not torch.equal(given.terms, none.terms)
    with pytest.raises(ValueError, match="class-conditional model is evaluated given a label"):
        evaluator.bits_per_dim(x0, timesteps=4)
    with pytest.raises(ValueError, match=r"labels must be one int or 2 ints in \[0, 10\]"):
        evaluator.bits_per_dim(x0, labels=[3, 11], timesteps=4)


def test_bad_images_are_refused(schedule):
    evaluator = Evaluator(df.UNet.small(), schedule)
    shape = evaluator.sample_shape
    good = torch.zeros(2, *shape)
    cases = [
        (good * 0 + 1.5, "images must lie in \\[-1, 1\\]"),
        (good.index_fill(0, torch.tensor([1]), float("nan")), "images must be finite"),
        (torch.zeros(2, shape[0] + 1, *shape[1:]), "the model takes images of shape"),
        (torch.zeros(2, shape[0], shape[1] + 2, shape[2]), "the model takes images of shape"),
        (torch.zeros(0, *shape), "no images to evaluate"),
        (torch.zeros(*shape), "images must be a float tensor \\[N, C, H, W\\]"),
    ]
    for images, message in cases:
        with pytest.raises(ValueError, match=message):
            evaluator.bits_per_dim(images)
    with pytest.raises(ValueError, match="labels are for a class-conditional model"):
        evaluator.bits_per_dim(good, labels=1)
    with pytest.raises(ValueError, match="sigma1 must be one of"):
        Evaluator(df.UNet.small(), schedule, sigma1="ho")
