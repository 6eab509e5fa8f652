"""NoiseSchedule against the paper's closed forms (Ho et al. 2020, §2 and eqs. 4-7)."""
import json
import math
from pathlib import Path

import pytest
import torch

from ddpm_fast import NoiseSchedule


def test_linear_schedule_tables():
    s = NoiseSchedule.linear(1000)
    assert s.num_timesteps == 1000
    for name in ("betas", "alphas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "posterior_variance", "posterior_mean_coef1", "posterior_mean_coef2"):
        table = getattr(s, name)
        assert table.dtype == torch.float64 and table.device.type == "cpu" and table.shape == (1000,), name
    assert s.betas[0].item() == 1e-4 and s.betas[-1].item() == 0.02
    assert torch.allclose(s.betas[1:] - s.betas[:-1], torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))
    assert abs(s.sqrt_alphas_cumprod[-1].item() - 0.00635) < 5e-6
    assert abs(1 - s.alphas_cumprod[-1].item() - 0.99996) < 5e-7


@pytest.mark.parametrize("t", [0, 1, 17, 500, 999])
def test_derived_tables_follow_their_formulas(t):
    s = NoiseSchedule.linear(1000)
    betas = s.betas.tolist()
    alpha_bar = math.prod(1 - b for b in betas[: t + 1])
    alpha_bar_prev = math.prod(1 - b for b in betas[:t])
    beta = betas[t]
    expected = {
        "alphas": 1 - beta,
        "alphas_cumprod": alpha_bar,
        "alphas_cumprod_prev": alpha_bar_prev,
        "sqrt_alphas_cumprod": math.sqrt(alpha_bar),
        "sqrt_one_minus_alphas_cumprod": math.sqrt(1 - alpha_bar),
        "sqrt_recip_alphas_cumprod": 1 / math.sqrt(alpha_bar),
        "sqrt_recipm1_alphas_cumprod": math.sqrt(1 / alpha_bar - 1),
        "posterior_variance": (1 - alpha_bar_prev) / (1 - alpha_bar) * beta,  # β̃_t, eq. 7
        "posterior_mean_coef1": math.sqrt(alpha_bar_prev) * beta / (1 - alpha_bar),
        "posterior_mean_coef2": math.sqrt(1 - beta) * (1 - alpha_bar_prev) / (1 - alpha_bar),
    }
    for name, value in expected.items():
        assert getattr(s, name)[t].item() == pytest.approx(value, rel=1e-12, abs=1e-300), name


def test_posterior_variance_vanishes_at_the_first_step():
    s = NoiseSchedule.linear(1000)
    assert s.posterior_variance[0].item() == 0.0
    assert s.posterior_mean_coef1[0].item() == pytest.approx(1.0) and s.posterior_mean_coef2[0].item() == 0.0


def test_cosine_schedule():
    T, s_ = 1000, 0.008
    s = NoiseSchedule.cosine(T)
    f = lambda t: math.cos((t / T + s_) / (1 + s_) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 10, 500, 900):
        assert s.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert s.betas.max().item() <= 0.999 and s.betas.min().item() > 0


def test_custom_betas_and_short_schedules():
    s = NoiseSchedule(torch.tensor([0.1, 0.2, 0.3]))
    assert torch.allclose(s.alphas_cumprod, torch.tensor([0.9, 0.72, 0.504], dtype=torch.float64))
    assert NoiseSchedule.linear(1).num_timesteps == 1


@pytest.mark.parametrize("make", [
    lambda: NoiseSchedule.linear(0), lambda: NoiseSchedule.linear(-5), lambda: NoiseSchedule.linear(10.5),
    lambda: NoiseSchedule.cosine(0), lambda: NoiseSchedule.linear(10, beta_start=0.1, beta_end=0.01),
    lambda: NoiseSchedule.linear(10, beta_start=0.0), lambda: NoiseSchedule.linear(10, beta_end=1.0),
    lambda: NoiseSchedule(torch.tensor([])), lambda: NoiseSchedule(torch.tensor([0.1, 1.0])),
    lambda: NoiseSchedule(torch.tensor([0.1, float("nan")])), lambda: NoiseSchedule(torch.ones(2, 2) * 0.1),
])
def test_bad_schedules_are_refused(make):
    with pytest.raises(ValueError):
        make()


def test_timestep_subsequences():
    s = NoiseSchedule.linear(1000)
    assert s.timesteps() == list(range(999, -1, -1))
    assert s.timesteps(10) == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert s.timesteps(3) == [666, 333, 0]
    quad = s.timesteps(5, "quadratic")
    assert quad == [i * i * 800 // 16 for i in range(5)][::-1]  # ⌊(i·√800/4)²⌋ = [800, 450, 200, 50, 0]
    for steps in (1, 7, 100, 1000):
        for spacing in ("uniform", "quadratic"):
            kept = s.timesteps(steps, spacing)
            assert kept == sorted(set(kept), reverse=True) and kept[-1] == 0
            assert len(kept) == steps if spacing == "uniform" else len(kept) <= steps
    # DDIM's quadratic sequence for 100 steps repeats 0 and other small t: the repeats are dropped
    ddim = sorted({i * i * 800 // 99 ** 2 for i in range(100)}, reverse=True)
    assert s.timesteps(100, "quadratic") == ddim and len(ddim) < 100


@pytest.mark.parametrize("steps,spacing,match", [
    (0, "uniform", "steps"), (1001, "uniform", "steps"), (2.5, "uniform", "steps"),
    (10, "cubic", "spacing"),
])
def test_bad_subsequences(steps, spacing, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule.linear(1000).timesteps(steps, spacing)


GUIDED_RESPACING = json.loads((Path(__file__).parent / "golden" / "space_timesteps.json").read_text())


@pytest.mark.parametrize("T,sections,kept", GUIDED_RESPACING["kept"], ids=lambda v: str(v)[:12])
def test_string_steps_keep_guided_diffusions_respaced_timesteps(T, sections, kept):
    # their space_timesteps' own output (tests/golden/make_space_timesteps.py), in sampling order
    assert NoiseSchedule.linear(T, 1e-4, 0.02).timesteps(sections) == kept[::-1]


@pytest.mark.parametrize("T,sections", GUIDED_RESPACING["refused"] + [[1000, "ddim0"], [1000, "ten"], [1000, "10,,5"],
                                                                    [1000, "-5"], [1000, ""]])
def test_respacings_guided_diffusion_cannot_take_are_refused(T, sections):
    with pytest.raises(ValueError, match="respacing"):
        NoiseSchedule.linear(T, 1e-4, 0.02).timesteps(sections)


def test_a_respaced_ddpm_run_steps_through_the_string_respacing():
    table = NoiseSchedule.linear(1000).step_table("ddpm", steps="ddim25")
    assert table.timesteps.tolist() == list(range(960, -1, -40))


def test_timestep_checks():
    s = NoiseSchedule.linear(10)
    s.check_timesteps(torch.tensor([0, 9]))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        s.check_timesteps(torch.tensor([10]))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        s.check_timesteps(torch.tensor([-1]))
    with pytest.raises(TypeError, match="integer"):
        s.check_timesteps(torch.tensor([1.0]))
