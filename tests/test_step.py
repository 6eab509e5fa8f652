"""The fused sampling update (ops.diffusion_step_) on every backend against the paper's
functions (p_sample, ddim_step) and the noise contract, its tables, and its bad inputs."""
import math

import pytest
import torch

import ddpm_fast as df
from ddpm_fast import NoiseSchedule
from ddpm_fast.contract import STEP_COLUMNS
from ddpm_fast.ops import diffusion_step_
from ddpm_fast.reference import diffusion as D
from ddpm_fast.reference import noise as ref_noise
from ddpm_fast.reference.diffusion_step import diffusion_step as reference_step
from helpers import opcheck_step, relative_error, ulp_distance
from test_noise import GOLDEN

T = 1000
CONFIGS = [  # (method, variance, eta)
    ("ddpm", "fixed_large", 0.0), ("ddpm", "fixed_small", 0.0), ("ddim", "fixed_large", 0.0),
    ("ddim", "fixed_large", 0.5), ("ddim", "fixed_large", 1.0),
]
OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def schedule():
    return df.NoiseSchedule.linear(T)


def _table(schedule, method, variance, eta, clip, prediction_type, steps=None):
    steps = 20 if method == "ddim" and steps is None else steps
    return schedule.step_table(method, variance, clip, prediction_type, steps, eta)


def _paper_step(schedule, table, index, out, x, z, method, variance, eta, clip, prediction_type):
    t = torch.full((x.shape[0],), int(table.timesteps[index]))
    if method == "ddpm":
        return D.p_sample(schedule, out, x, t, z, clip, variance, prediction_type)
    t_prev = int(table.timesteps[index + 1]) if index + 1 < len(table) else -1
    return D.ddim_step(schedule, out, x, t, torch.full_like(t, t_prev), z, eta, clip, prediction_type)


def _inputs(seed, shape=(3, 3, 5, 7), out_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 1.5
    return x, torch.randn(shape, generator=g).to(out_dtype)


@pytest.mark.parametrize("method,variance,eta", CONFIGS)
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("prediction_type", ["epsilon", "x0", "v"])
def test_tables_reproduce_the_papers_updates(schedule, method, variance, eta, clip, prediction_type):
    # In float64 the table-driven update is p_sample / ddim_step to rounding, row by row.
    table = _table(schedule, method, variance, eta, clip, prediction_type)
    x, out = (v.double() for v in _inputs(0))
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for index in sorted({0, 1, len(table) // 2, len(table) - 2, len(table) - 1}):
        expected = _paper_step(schedule, table, index, out, x, z, method, variance, eta, clip, prediction_type)
        got = reference_step(x, out, table.coefs[index], z)
        assert relative_error(got, expected) < 1e-12, (index, int(table.timesteps[index]))


def test_ddim_eta1_table_equals_ddpm_fixed_small_table(schedule):
    # DESIGN §2's anchor: DDIM with η = 1 over all T steps, ε re-derived, is DDPM with σ² = β̃_t.
    ddim = schedule.step_table("ddim", clip_denoised=True, steps=T, eta=1.0)
    ddpm = schedule.step_table("ddpm", "fixed_small", clip_denoised=True)
    assert torch.allclose(ddim.coefs, ddpm.coefs, rtol=1e-9, atol=1e-12)
    assert torch.equal(ddim.timesteps, ddpm.timesteps) and torch.equal(ddim.noise_keys, ddpm.timesteps)


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
@pytest.mark.parametrize("steps", [1, 7, 50, T - 1])
def test_respaced_ddpm_table_is_the_full_table_of_the_respaced_schedule(schedule, variance, steps):
    # Nichol & Dhariwal 2021 §4: DDPM over kept timesteps S is DDPM (eqs. 6-7) for the schedule
    # β'_t = 1 − ᾱ_t/ᾱ_s (s the previous kept timestep), i.e. the chain of kept ᾱ's.
    table = schedule.step_table("ddpm", variance, steps=steps)
    kept = table.timesteps.flip(0)
    ab = schedule.alphas_cumprod[kept]
    respaced = NoiseSchedule(1 - ab / torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]]))
    expected = respaced.step_table("ddpm", variance)
    assert torch.allclose(table.coefs, expected.coefs, rtol=1e-10, atol=0), (table.coefs - expected.coefs).abs().max()
    assert torch.equal(table.noise_keys, table.timesteps) and kept[0].item() == 0


def test_last_row_has_no_noise(schedule):
    for variance in ("fixed_large", "fixed_small"):
        assert schedule.step_table("ddpm", variance).coefs[-1, 5].item() == 0.0
    assert schedule.step_table("ddpm", "fixed_large").coefs[0, 5].item() == pytest.approx(math.sqrt(0.02))


@pytest.mark.parametrize("method,variance,eta", CONFIGS)
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("prediction_type", ["epsilon", "x0", "v"])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
def test_fused_step_matches_the_paper(schedule, fused, method, variance, eta, clip, prediction_type, out_dtype):
    impl, device = fused
    table = _table(schedule, method, variance, eta, clip, prediction_type)
    on_device = table.to(device)
    x, out = _inputs(2, out_dtype=out_dtype)
    seed, offset = 11, 5
    for index in sorted({0, len(table) // 2, len(table) - 1}):
        key = int(table.noise_keys[index])
        z = ref_noise.randn(tuple(x.shape), seed, key, offset).double()
        expected = _paper_step(schedule, table, index, out.double(), x.double(), z, method, variance, eta, clip,
                               prediction_type)
        got = x.to(device).clone()
        diffusion_step_(got, out.to(device), on_device.coefs, on_device.noise_keys,
                        torch.tensor([index], device=device), seed=seed, sample_offset=offset, impl=impl)
        assert relative_error(got, expected) <= 1e-6, (index, int(table.timesteps[index]))


DPM_CONFIGS = [("dpm-solver++", False), ("dpm-solver++-sde", False), ("dpm-solver++", True)]  # (method, karras)


@pytest.mark.parametrize("method,karras", DPM_CONFIGS)
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("prediction_type", ["epsilon", "x0", "v"])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
def test_fused_multistep_step_matches_the_reference(schedule, fused, method, karras, clip, prediction_type, out_dtype):
    # DPM-Solver++ rows read the previous x̂0 from the history buffer and leave this row's there
    impl, device = fused
    table = schedule.step_table(method, clip_denoised=clip, prediction_type=prediction_type, steps=12, karras=karras)
    on_device = table.to(device)
    x, out = _inputs(7, out_dtype=out_dtype)
    history = torch.randn(x.shape, generator=torch.Generator().manual_seed(8)).clamp(-1, 1)
    seed, offset = 12, 3
    for index in (0, 1, 6, len(table) - 1):
        z = ref_noise.randn(tuple(x.shape), seed, int(table.noise_keys[index]), offset).double()
        expected_history = history.double()
        expected = reference_step(x.double(), out.double(), table.coefs[index], z, expected_history)
        got, got_history = x.to(device), history.to(device)
        diffusion_step_(got, out.to(device), on_device.coefs, on_device.noise_keys,
                        torch.tensor([index], device=device), seed=seed, sample_offset=offset, history=got_history,
                        impl=impl)
        assert relative_error(got, expected) <= 1e-6, index
        assert relative_error(got_history, expected_history) <= 1e-6, index


def test_multistep_row_without_history_is_refused(schedule):
    table = schedule.step_table("dpm-solver++", steps=10)
    x, out = _inputs(9)
    with pytest.raises(ValueError, match="history buffer"):
        diffusion_step_(x, out, table.coefs.float(), table.noise_keys, torch.tensor([3]), seed=0)


@pytest.mark.parametrize("impl", ["cpu", "triton", "reference"])
def test_bad_history(schedule, impl):
    table = schedule.step_table("dpm-solver++", steps=10)
    coefs, keys, index = table.coefs.float(), table.noise_keys, torch.tensor([3])
    x, out = _inputs(10)
    for history, match in ((torch.zeros(3, 3, 5, 6), "x's shape"), (torch.zeros(3, 3, 5, 7).double(), "float32"),
                           (torch.zeros(3, 3, 7, 5).transpose(2, 3), "strides"), (x, "shares memory"),
                           (out, "shares memory")):
        with pytest.raises(ValueError, match=match):
            diffusion_step_(x, out, coefs, keys, index, seed=0, history=history, impl=impl)


@pytest.mark.parametrize("case,values", GOLDEN)
def test_golden_draws_through_the_step(fused, case, values):
    # A row that keeps only σ·z (σ = 1) writes the noise itself: the committed draws, ≤ 4 ulps.
    impl, device = fused
    coefs = _noise_row(device)
    keys = torch.tensor([case["step"]], device=device)
    x = torch.zeros(case["shape"], device=device)
    diffusion_step_(x, torch.zeros_like(x), coefs, keys, torch.zeros(1, dtype=torch.int64, device=device),
                    seed=case["seed"], sample_offset=case["sample_offset"], impl=impl)
    assert ulp_distance(x.flatten(), torch.tensor(values)).max() <= 4


def _noise_row(device):
    # one row that keeps σ·z alone (σ = 1)
    row = torch.zeros(1, len(STEP_COLUMNS), device=device)
    row[0, STEP_COLUMNS.index("sigma")] = 1.0
    return row


def _noise_through(impl, device, shape, seed, key, offset=0, memory_format=torch.contiguous_format):
    x = torch.zeros(shape, device=device).to(memory_format=memory_format)
    diffusion_step_(x, torch.zeros_like(x), _noise_row(device),
                    torch.tensor([key], device=device), torch.zeros(1, dtype=torch.int64, device=device),
                    seed=seed, sample_offset=offset, impl=impl)
    return x


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 7, 9), (5, 16), (1, 4, 8, 8)])
def test_fused_noise_is_the_reference_stream(fused, shape):
    impl, device = fused
    got = _noise_through(impl, device, shape, seed=2 ** 35 + 3, key=777, offset=9)
    assert ulp_distance(got, ref_noise.randn(shape, 2 ** 35 + 3, 777, 9)).max() <= 4


def test_layouts_do_not_change_the_update(fused, schedule):
    impl, device = fused
    table = schedule.step_table("ddpm").to(device)
    x, out = (v.to(device) for v in _inputs(3, shape=(2, 4, 6, 5)))
    index = torch.tensor([300], device=device)

    def run(xx, oo):
        xx = xx.clone(memory_format=torch.preserve_format) if xx.is_contiguous() or xx.is_contiguous(
            memory_format=torch.channels_last) else xx
        diffusion_step_(xx, oo, table.coefs, table.noise_keys, index, seed=1, impl=impl)
        return xx

    base = run(x.clone(), out)
    cl = torch.channels_last
    assert torch.equal(run(x.to(memory_format=cl), out), base)  # same noise for the same logical element
    assert torch.equal(run(x.clone(), out.to(memory_format=cl)), base)
    wide = torch.randn(2, 4, 6, 10, device=device)
    wide[..., ::2] = out
    assert torch.equal(run(x.clone(), wide[..., ::2]), base)  # non-contiguous network output
    strided = torch.zeros(2, 4, 6, 10, device=device)
    strided[..., ::2] = x
    view = strided[..., ::2]
    diffusion_step_(view, out, table.coefs, table.noise_keys, index, seed=1, impl=impl)  # in place on a view
    assert torch.equal(view, base) and (strided[..., 1::2] == 0).all()


def test_history_follows_x_layout(fused, schedule):
    # history has x's strides; channels_last x and history give the NCHW result element for element
    impl, device = fused
    table = schedule.step_table("dpm-solver++-sde", steps=8).to(device)
    x, out = (v.to(device) for v in _inputs(11, shape=(2, 4, 6, 5)))
    history = torch.randn(x.shape, generator=torch.Generator().manual_seed(12)).to(device)
    index = torch.tensor([4], device=device)
    results = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        xx, hh = x.to(memory_format=fmt).clone(memory_format=fmt), history.to(memory_format=fmt).clone(memory_format=fmt)
        diffusion_step_(xx, out, table.coefs, table.noise_keys, index, seed=1, history=hh, impl=impl)
        results.append((xx, hh))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("method", ["ddim", "dpm-solver++-sde"])
def test_a_sample_is_updated_the_same_in_any_batch(fused, schedule, method):
    impl, device = fused
    table = schedule.step_table(method, steps=10, eta=1.0 if method == "ddim" else 0.0).to(device)
    x, out = (v.to(device) for v in _inputs(4, shape=(8, 3, 4, 4)))
    history = torch.randn(x.shape, generator=torch.Generator().manual_seed(13)).to(device) if table.multistep else None
    index = torch.tensor([3], device=device)
    whole, whole_history = x.clone(), history.clone() if history is not None else None
    diffusion_step_(whole, out, table.coefs, table.noise_keys, index, seed=5, history=whole_history, impl=impl)
    part, part_history = x[4:7].clone(), history[4:7].clone() if history is not None else None
    diffusion_step_(part, out[4:7], table.coefs, table.noise_keys, index, seed=5, sample_offset=4,
                    history=part_history, impl=impl)
    assert torch.equal(part, whole[4:7])
    if history is not None:
        assert torch.equal(part_history, whole_history[4:7])


def test_noise_statistics_over_a_million_draws():
    # through the C++ op (the interpreter is too slow for 10^6): moments, a Kolmogorov–Smirnov
    # test against N(0, 1) at α = 0.001, and no correlation between neighbours, samples or steps
    n_samples, per = 96, 3 * 64 * 64
    z = _noise_through("cpu", torch.device("cpu"), (n_samples, per), seed=123, key=500).double()
    flat = z.flatten()
    n = flat.numel()
    assert n >= 10 ** 6
    assert abs(flat.mean()) < 5 / n ** 0.5 and abs(flat.var() - 1) < 5 * (2 / n) ** 0.5
    cdf = 0.5 * (1 + torch.erf(flat.sort().values / math.sqrt(2)))
    ks = torch.maximum(torch.arange(1, n + 1) / n - cdf, cdf - torch.arange(n) / n).max().item()
    assert ks < 1.95 / n ** 0.5
    other_step = _noise_through("cpu", torch.device("cpu"), (n_samples, per), seed=123, key=499).double()
    for a, b in ((z[:, :-1], z[:, 1:]), (z[:-1], z[1:]), (z, other_step)):
        corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
        assert abs(corr) < 5 / a.numel() ** 0.5


@pytest.mark.parametrize("method", ["ddpm", "dpm-solver++"])
def test_opcheck(fused, schedule, method):
    impl, device = fused
    table = schedule.step_table(method).to(device)
    x, out = (v.to(device) for v in _inputs(5, out_dtype=torch.bfloat16))
    history = torch.zeros_like(x) if method == "dpm-solver++" else None
    args = (x, out, table.coefs, table.noise_keys, torch.tensor([10 if method == "ddpm" else 5], device=device), 3, 0,
            history, None, None, None)  # every argument: the schemas have no defaults (DESIGN §5.5)
    opcheck_step(impl, device, args)


@pytest.mark.parametrize("method", ["ddpm", "dpm-solver++-sde"])
def test_compiles_without_graph_breaks(fused, schedule, method):
    impl, device = fused
    table = schedule.step_table(method).to(device)
    x, out = (v.to(device) for v in _inputs(6))
    index = torch.tensor([200 if method == "ddpm" else 7], device=device)
    multistep = method != "ddpm"

    def f(x, out):
        x = x * 1.0
        history = torch.ones_like(x) if multistep else None
        diffusion_step_(x, out, table.coefs, table.noise_keys, index, seed=4, history=history, impl=impl, check=False)
        return x + 0.0 if history is None else x + history

    # inductor on GPUs; aot_eager on the CPU keeps the test quick and still traces through the
    # fake kernel and the functionalisation of the in-place op
    backend = "inductor" if device.type == "cuda" else "aot_eager"
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    assert torch.equal(compiled(x, out), f(x, out))


@pytest.mark.parametrize("impl", ["cpu", "triton", "reference"])
def test_bad_inputs(schedule, impl):
    table = schedule.step_table("ddpm").to("cpu")
    x, out = _inputs(7)
    index = torch.tensor([3])
    call = lambda **kw: diffusion_step_(**{**dict(x=x.clone(), model_output=out, coefs=table.coefs,  # noqa: E731
                                                  noise_keys=table.noise_keys, step_index=index, seed=0,
                                                  impl=impl), **kw})
    with pytest.raises(TypeError, match="x must be float32"):
        call(x=x.double())
    with pytest.raises(TypeError, match="model_output must be"):
        call(model_output=out.double())
    with pytest.raises(ValueError, match="x's shape"):
        call(model_output=out[:, :2])
    with pytest.raises(ValueError, match="on meta but x is on cpu"):
        call(step_index=torch.zeros(1, dtype=torch.int64, device="meta"))
    with pytest.raises(IndexError, match="outside the table of 1000 rows"):
        call(step_index=torch.tensor([1000]))
    with pytest.raises(IndexError, match="outside the table"):
        call(step_index=torch.tensor([-1]))
    bad = table.coefs.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        call(coefs=bad)
    with pytest.raises(ValueError, match=r"\[S, 14\]"):
        call(coefs=table.coefs[:, :6].contiguous())
    with pytest.raises(ValueError, match="seed"):
        call(seed=-3)


def test_raw_op_checks_the_index_on_the_cpu(schedule):
    table = schedule.step_table("ddpm")
    x, out = _inputs(8)
    with pytest.raises(RuntimeError, match="outside the table"):
        torch.ops.ddpm_fast.diffusion_step_(x, out, table.coefs.float(), table.noise_keys, torch.tensor([1000]), 0, 0,
                                            None, None, None, None)


@pytest.mark.parametrize("index", [1000, -1])
def test_out_of_table_index_writes_nan(device, schedule, index):
    # the device-side guard GPUs have instead of a host check: Triton's runs in the interpreter too
    table = schedule.step_table("ddpm").to(device)
    for impl in ("triton", "cuda") if device.type == "cuda" else ("triton",):
        x = torch.zeros(2, 3, 4, 4, device=device)
        diffusion_step_(x, torch.zeros_like(x), table.coefs, table.noise_keys, torch.tensor([index], device=device),
                        seed=0, impl=impl, check=False)
        assert torch.isnan(x).all()


@pytest.mark.parametrize("kwargs", [dict(eta=1.5), dict(eta=-0.1), dict(method="ddpm", steps=0),
                                    dict(method="ddpm", eta=0.5), dict(prediction_type="score")])
def test_bad_tables(schedule, kwargs):
    with pytest.raises(ValueError):
        schedule.step_table(**kwargs)
