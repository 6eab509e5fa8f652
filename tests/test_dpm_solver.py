"""DPM-Solver++(2M) and its SDE variant (DESIGN §2.4): timesteps and σ as diffusers defines
them, the table rows against the paper's equations (reference/dpm_solver.py), and whole runs
of the bundled digits model against diffusers' DPMSolverMultistepScheduler on every backend."""
import copy

import numpy as np
import pytest
import torch

from ddpm_fast import NoiseSchedule, Sampler, UNet, dpm_solver
from ddpm_fast.ops import randn
from ddpm_fast.reference import diffusion_step, dpm_solver_pp
from helpers import relative_error

diffusers = pytest.importorskip("diffusers")

T = 1000
SPACINGS = [("linspace", False), ("leading", False), ("trailing", False), ("lambda", False), ("linspace", True)]
PREDICTIONS = {"epsilon": "epsilon", "x0": "sample", "v": "v_prediction"}  # ours → diffusers'
N, SEED = 4, 3


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.linear(T)


@pytest.fixture(scope="module")
def digits():
    return UNet.from_pretrained("digits").eval()


def _theirs(spacing, karras, prediction="epsilon", clip=False, sde=False, float64=True):
    """diffusers' scheduler for our (spacing, karras); float64=True recomputes its σ table in
    float64 with its own functions (it casts σ to float32 in set_timesteps)."""
    sched = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=T, beta_schedule="linear", solver_order=2, prediction_type=PREDICTIONS[prediction],
        thresholding=clip, sample_max_value=1.0, algorithm_type="sde-dpmsolver++" if sde else "dpmsolver++",
        timestep_spacing="linspace" if spacing == "lambda" else spacing, use_karras_sigmas=karras,
        use_lu_lambdas=spacing == "lambda")
    if float64:
        sched.alphas_cumprod = NoiseSchedule.linear(T).alphas_cumprod.clone()
    return sched


def _set_timesteps(sched, steps, float64=True):
    sched.set_timesteps(steps)
    if float64:
        ab = sched.alphas_cumprod.numpy()
        grid = np.sqrt((1 - ab) / ab)
        if sched.config.use_karras_sigmas:
            sigmas = sched._convert_to_karras(in_sigmas=np.flip(grid).copy(), num_inference_steps=steps)
        elif sched.config.use_lu_lambdas:
            sigmas = np.exp(sched._convert_to_lu(in_lambdas=np.flip(np.log(grid)).copy(), num_inference_steps=steps))
        else:
            sigmas = grid[sched.timesteps.numpy()]
        sched.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]))


@pytest.mark.parametrize("spacing,karras", SPACINGS)
@pytest.mark.parametrize("steps", [1, 2, 10, 15, 20, 25, 100, 999])
def test_timesteps_and_sigmas_are_diffusers(schedule, spacing, karras, steps):
    theirs = _theirs(spacing, karras)
    _set_timesteps(theirs, steps)
    timesteps, sigmas = dpm_solver.timesteps_and_sigmas(schedule.alphas_cumprod, steps, spacing, karras)
    assert timesteps == theirs.timesteps.tolist()
    assert np.allclose(sigmas, theirs.sigmas.numpy(), rtol=1e-12, atol=0)


def test_linspace_at_20_steps_is_999_to_50(schedule):
    timesteps, _ = dpm_solver.timesteps_and_sigmas(schedule.alphas_cumprod, 20)
    assert timesteps[0] == 999 and timesteps[-1] == 50 and len(timesteps) == 20


@pytest.mark.parametrize("final_sigma", ["zero", "sigma_min"])
@pytest.mark.parametrize("steps", [1, 2, 3, 14, 15, 20])
def test_order_schedule_is_diffusers(steps, final_sigma, monkeypatch):
    # diffusers' step() chooses the first- or second-order update; record which, step by step. The
    # expectation is written out (DESIGN §2.4), not computed by the code under test: first order at
    # the first step and, with final σ 0 or below 15 steps (lower_order_final), at the last
    last = 1 if final_sigma == "zero" or steps < 15 else 2
    expected = {1: [1], 2: [1, last], 3: [1, 2, last]}.get(steps, [1] + [2] * (steps - 2) + [last])
    sched = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=T, beta_schedule="linear",
                                                  final_sigmas_type=final_sigma)
    sched.set_timesteps(steps)
    picked = []
    first, second = sched.dpm_solver_first_order_update, sched.multistep_dpm_solver_second_order_update
    monkeypatch.setattr(sched, "dpm_solver_first_order_update", lambda *a, **k: picked.append(1) or first(*a, **k))
    monkeypatch.setattr(sched, "multistep_dpm_solver_second_order_update",
                        lambda *a, **k: picked.append(2) or second(*a, **k))
    x = torch.randn(1, 1, 2, 2)
    for t in sched.timesteps:
        x = sched.step(torch.zeros_like(x), t, x).prev_sample
    assert picked == expected
    assert dpm_solver.orders(steps, 2, final_sigma) == expected


@pytest.mark.parametrize("spacing,karras", SPACINGS)
@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("sde", [False, True])
def test_table_rows_are_the_papers_equations(schedule, spacing, karras, prediction, clip, sde):
    # the folded rows (C, D, H, σ) against Algorithm 2 written with λ, h, r and D_i, in float64
    steps = 9
    method = "dpm-solver++-sde" if sde else "dpm-solver++"
    table = schedule.step_table(method, clip_denoised=clip, prediction_type=prediction, steps=steps, spacing=spacing,
                                karras=karras)
    timesteps, sigmas = dpm_solver.timesteps_and_sigmas(schedule.alphas_cumprod, steps, spacing, karras)
    g = torch.Generator().manual_seed(0)
    weights = torch.randn(steps, 2, 3, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(steps, 2, 3, 4, 4, generator=g, dtype=torch.float64)
    t_index = {t: i for i, t in enumerate(timesteps)}

    def model(x, t):  # a smooth stand-in network, different at every timestep
        return torch.tanh(x * weights[t_index[int(t[0])], 0] + weights[t_index[int(t[0])], 1])

    x_T = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    orders = [1, 2, 2, 2, 2, 2, 2, 2, 1]  # Algorithm 2 at 9 steps to σ = 0 (test_order_schedule_is_diffusers)
    expected = dpm_solver_pp(model, x_T, timesteps, sigmas, orders, prediction, clip, sde, noise=lambda i: noise[i])
    x, history = x_T.clone(), torch.zeros_like(x_T)
    for i, t in enumerate(table.timesteps.tolist()):
        x = diffusion_step(x, model(x, torch.full((2,), t)), table.coefs[i], noise[i], history)
    assert relative_error(x, expected) < 1e-12


class _Reparametrised(torch.nn.Module):
    """The digits network as an ε-, x0- or v-prediction model (the same trained function); a
    module, so that the Sampler runs on the network's device."""

    def __init__(self, digits, prediction, schedule):
        super().__init__()
        self.digits, self.prediction = digits, prediction
        device = next(digits.parameters()).device
        self.register_buffer("sqrt_ab", schedule.sqrt_alphas_cumprod.float().to(device))
        self.register_buffer("sqrt_1m_ab", schedule.sqrt_one_minus_alphas_cumprod.float().to(device))

    def forward(self, x, t):
        eps = self.digits(x, t)
        a, s = self.sqrt_ab[t].view(-1, 1, 1, 1), self.sqrt_1m_ab[t].view(-1, 1, 1, 1)
        if self.prediction == "epsilon":
            return eps
        x0 = (x - s * eps) / a
        return x0 if self.prediction == "x0" else a * eps - s * x0


_model = _Reparametrised


def _diffusers_run(sched, model, steps, x, sde, float64=True):
    _set_timesteps(sched, steps, float64)
    with torch.inference_mode():
        for t in sched.timesteps:
            out = model(x, t.expand(x.shape[0]))
            z = randn(tuple(x.shape), seed=SEED, step=int(t), sample_offset=0) if sde else None
            x = sched.step(out, t, x, variance_noise=z).prev_sample
    return x


def _ours(digits, schedule, prediction, spacing, karras, clip, sde, steps, backend="cpu"):
    digits.backend = "cpu" if next(digits.parameters()).is_cpu else "auto"  # `backend` is the step's
    sampler = Sampler(_model(digits, prediction, schedule), schedule, method="dpm-solver++-sde" if sde else "dpm-solver++",
                      steps=steps, spacing=spacing, use_karras_sigmas=karras, clip_denoised=clip,
                      prediction_type=prediction, backend=backend, sample_shape=(1, 16, 16))
    return sampler.sample(N, seed=SEED).cpu()


@pytest.mark.parametrize("spacing,karras", SPACINGS)
@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
@pytest.mark.parametrize("clip", [False, True])
def test_runs_equal_diffusers_on_the_digits_model(digits, schedule, spacing, karras, prediction, clip):
    steps = 20
    x_T = randn((N, 1, 16, 16), seed=SEED, step=T, sample_offset=0)
    expected = _diffusers_run(_theirs(spacing, karras, prediction, clip), _model(digits, prediction, schedule), steps,
                              x_T.clone(), sde=False)
    got = _ours(digits, schedule, prediction, spacing, karras, clip, False, steps)
    assert relative_error(got, expected) <= 1e-5


@pytest.mark.parametrize("spacing,karras", [("linspace", False), ("trailing", False), ("linspace", True)])
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_sde_runs_equal_diffusers_fed_our_noise(digits, schedule, spacing, karras, prediction):
    steps = 15
    x_T = randn((N, 1, 16, 16), seed=SEED, step=T, sample_offset=0)
    expected = _diffusers_run(_theirs(spacing, karras, prediction, sde=True), _model(digits, prediction, schedule),
                              steps, x_T.clone(), sde=True)
    got = _ours(digits, schedule, prediction, spacing, karras, False, True, steps)
    assert relative_error(got, expected) <= 1e-5


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("sde", [False, True])
def test_every_backend_equals_diffusers(digits, schedule, backend, sde, triton_device, monkeypatch):
    steps = 10
    x_T = randn((N, 1, 16, 16), seed=SEED, step=T, sample_offset=0)
    expected = _diffusers_run(_theirs("linspace", False, "epsilon", True, sde), _model(digits, "epsilon", schedule),
                              steps, x_T.clone(), sde=sde)
    if backend == "triton" and triton_device.type == "cuda":  # the Triton step needs its tensors on the GPU
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # float32 convolutions, as on the CPU
        digits = copy.deepcopy(digits).to(triton_device)
    got = _ours(digits, schedule, "epsilon", "linspace", False, True, sde, steps, backend)
    assert relative_error(got, expected) <= 1e-5


def test_diffusers_own_float32_tables_agree_to_1e4(digits, schedule):
    steps = 20
    x_T = randn((N, 1, 16, 16), seed=SEED, step=T, sample_offset=0)
    theirs = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=T, beta_schedule="linear")
    expected = _diffusers_run(theirs, _model(digits, "epsilon", schedule), steps, x_T.clone(), sde=False,
                              float64=False)
    got = _ours(digits, schedule, "epsilon", "linspace", False, False, False, steps)
    assert relative_error(got, expected) <= 1e-4


def test_sde_samples_do_not_depend_on_the_batch(digits, schedule):
    # the update is bitwise batch-invariant (tests/test_step.py); the network's convolutions are
    # so only to rounding
    sampler = Sampler(digits, schedule, method="dpm-solver++-sde", steps=8)
    whole = sampler.sample(5, seed=9)
    assert relative_error(sampler.sample(2, seed=9, sample_offset=2), whole[2:4]) <= 1e-5
    assert relative_error(sampler.sample(5, seed=9, batch_size=2), whole) <= 1e-5
    assert torch.equal(sampler.sample(5, seed=9), whole)
    assert relative_error(sampler.sample(5, seed=10), whole) > 0.1


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="dpm-solver++", spacing="quadratic"), "spacing must be one of"),
    (dict(method="dpm-solver++", spacing="trailing", use_karras_sigmas=True), "Karras sigmas choose"),
    (dict(method="ddim", use_karras_sigmas=True, steps=10), "belong to the DPM-Solver methods"),
    (dict(method="dpm-solver++", eta=0.5), "takes no eta"),
    (dict(method="dpm-solver++", steps=[999, 500]), "takes a number of steps"),
    (dict(method="dpm-solver++", steps=0), "steps must be an int"),
    (dict(method="dpm-solver++-sde", steps=400, use_karras_sigmas=True), "distinct timesteps"),
])
def test_bad_solver_arguments(digits, schedule, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sampler(digits, schedule, **kwargs)


def _fused(**config):
    from ddpm_fast.integrations.diffusers import FusedDPMSolverMultistepScheduler
    return FusedDPMSolverMultistepScheduler(num_train_timesteps=T, beta_schedule="linear", **config)


@pytest.mark.parametrize("config", [
    dict(), dict(prediction_type="v_prediction", use_karras_sigmas=True, thresholding=True),
    dict(timestep_spacing="trailing", prediction_type="sample"), dict(use_lu_lambdas=True),
    dict(algorithm_type="sde-dpmsolver++"), dict(final_sigmas_type="sigma_min", solver_order=1),
])
def test_fused_scheduler_is_a_drop_in(digits, schedule, config):
    assert _drop_in_error(digits, schedule, config, 12) <= 1e-4


@pytest.mark.parametrize("steps", [6, 12, 20])
def test_sigma_min_final_at_order_2_with_lower_order_final_is_diffusers(digits, schedule, steps):
    # final σ "sigma_min" (h finite at the last step) at order 2: lower_order_final makes the last
    # step first order below 15 steps, second order from 15 (an order schedule that ignores it
    # there measured 0.201 from diffusers at 6 steps and 0.0840 at 12)
    assert _drop_in_error(digits, schedule, dict(final_sigmas_type="sigma_min", lower_order_final=True), steps) <= 1e-4


def _drop_in_error(digits, schedule, config, steps):
    """FusedDPMSolverMultistepScheduler's run against diffusers' with the same config, whole runs
    of the digits model from the same x_T: the relative error of the final samples."""
    sde = config.get("algorithm_type") == "sde-dpmsolver++"
    prediction = {v: k for k, v in PREDICTIONS.items()}[config.get("prediction_type", "epsilon")]
    model = _model(digits, prediction, schedule)
    stock = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=T, beta_schedule="linear", **config)
    ours = _fused(**config)
    x_T = randn((N, 1, 16, 16), seed=SEED, step=T, sample_offset=0)
    expected = _diffusers_run(stock, model, steps, x_T.clone(), sde=sde, float64=False)
    ours.set_timesteps(steps)
    ours.seed = SEED  # the SDE variant's z is the contract's for SEED, as _diffusers_run feeds diffusers
    assert ours.timesteps.tolist() == stock.timesteps.tolist()
    x = x_T.clone()
    with torch.inference_mode():
        for t in ours.timesteps:
            x = ours.step(model(x, t.expand(N)), t, x).prev_sample
    return relative_error(x, expected)


def test_fused_scheduler_float64_and_saved_config(digits, schedule, tmp_path):
    ours = _fused()
    ours.set_timesteps(6)
    x = randn((2, 1, 16, 16), seed=1, step=T, sample_offset=0).double()
    model = _model(digits, "epsilon", schedule)
    for t in ours.timesteps:  # float64 samples run the reference update with a float64 history
        x = ours.step(model(x.float(), t.expand(2)).double(), t, x).prev_sample
    assert x.dtype == torch.float64 and torch.isfinite(x).all()
    ours.save_pretrained(tmp_path)
    loaded = diffusers.DPMSolverMultistepScheduler.from_pretrained(tmp_path)
    assert type(loaded) is diffusers.DPMSolverMultistepScheduler and loaded.config.solver_order == 2


@pytest.mark.parametrize("config,match", [
    (dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"), "algorithm_type='dpmsolver'"),
    (dict(solver_order=3), "solver_order=3"),
    (dict(solver_type="heun"), "solver_type='heun'"), (dict(euler_at_final=True), "euler_at_final=True"),
    (dict(thresholding=True, sample_max_value=2.0), "sample_max_value=2.0"),
    (dict(steps_offset=1), "steps_offset=1"), (dict(use_exponential_sigmas=True), "use_exponential_sigmas"),
])
def test_fused_scheduler_refuses_what_it_does_not_cover(config, match):
    with pytest.raises(NotImplementedError, match=match):
        _fused(**config).set_timesteps(10)


def test_fused_scheduler_bad_calls():
    ours = _fused(algorithm_type="sde-dpmsolver++")
    x = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="set_timesteps first"):
        ours.step(x, 999, x)
    ours.set_timesteps(3)
    with pytest.raises(NotImplementedError, match="variance_noise"):
        ours.step(x, 999, x, variance_noise=x)
    with pytest.raises(NotImplementedError, match="custom timesteps"):
        ours.set_timesteps(timesteps=[999, 500])
    for t in ours.timesteps:
        x = ours.step(torch.zeros_like(x), t, x).prev_sample
    with pytest.raises(IndexError, match="all 3 steps"):
        ours.step(x, 0, x)


def test_accelerate_swaps_a_dpm_solver_pipeline_scheduler():
    from ddpm_fast.integrations.diffusers import FusedDPMSolverMultistepScheduler, accelerate
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2)
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DPMSolverMultistepScheduler())
    assert accelerate(pipe)["scheduler"] == 1 and isinstance(pipe.scheduler, FusedDPMSolverMultistepScheduler)
    images = pipe(batch_size=2, num_inference_steps=5, output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()
    heun = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DPMSolverMultistepScheduler(solver_type="heun"))
    assert accelerate(heun)["scheduler"] == 0 and type(heun.scheduler) is diffusers.DPMSolverMultistepScheduler


def test_cli_samples_with_dpm_solver(tmp_path, digits, schedule):
    from ddpm_fast.cli import main
    out = tmp_path / "new" / "folder" / "samples.npz"  # missing folders are created
    assert main(["sample", "--model", "digits", "--num", "3", "--method", "dpm-solver++-sde", "--steps", "6",
                 "--karras", "--seed", "4", "--out", str(out), "--quiet"]) == 0
    expected = Sampler(digits, schedule, method="dpm-solver++-sde", steps=6, use_karras_sigmas=True).sample(3, seed=4)
    got = torch.from_numpy(np.load(out)["arr_0"]).permute(0, 3, 1, 2).float()
    assert (got - ((expected + 1) * 127.5).round().clamp(0, 255)).abs().max() <= 1
    assert main(["sample", "--method", "dpm-solver++", "--spacing", "quadratic", "--out", str(tmp_path / "g.png")]) == 2


def test_fused_scheduler_started_part_way_is_first_order_like_diffusers(digits, schedule):
    # img2img-style: a pipeline that enters the run at its 6th timestep takes a first-order step
    # there (diffusers counts the steps taken, lower_order_nums), then second-order ones
    steps, start = 12, 5
    model = _model(digits, "epsilon", schedule)
    stock, ours = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=T), _fused()
    results = []
    for sched, generator in ((stock, None), (ours, torch.Generator().manual_seed(SEED))):
        sched.set_timesteps(steps)
        x = randn((N, 1, 16, 16), seed=SEED, step=T, sample_offset=0)
        with torch.inference_mode():
            for t in sched.timesteps[start:]:
                x = sched.step(model(x, t.expand(N)), t, x, generator=generator).prev_sample
        results.append(x)
    assert relative_error(results[1], results[0]) <= 1e-4


def test_repeated_timesteps_are_identity_steps(schedule):
    # linspace at S close to T rounds two timesteps onto one: h = 0 there, x unchanged (as in
    # diffusers), and the next step, with h_prev = 0, first order
    table = schedule.step_table("dpm-solver++", steps=T)
    kept = table.timesteps.tolist()
    repeat = next(i for i in range(1, len(kept)) if kept[i] == kept[i - 1]) - 1
    assert table.coefs[repeat].tolist()[2:6] == [0.0, 1.0, 0.0, 0.0] and table.coefs[repeat, 7] == 0
    assert table.coefs[repeat + 1, 7] == 0 and torch.isfinite(table.coefs).all()
