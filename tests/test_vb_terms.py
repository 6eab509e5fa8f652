"""The bound's fused per-timestep term (ops.vb_terms) on every backend against the paper's
equations in float64 (reference/vb_terms.py), its decoder against numerical integration, its
registrations and its bad inputs (DESIGN §2.6)."""
import math

import pytest
import torch
from scipy import integrate, stats

import ddpm_fast as df
from ddpm_fast.contract import TERM_COLUMNS
from ddpm_fast.likelihood import term_table
from ddpm_fast.ops.vb_terms import vb_terms
from ddpm_fast.reference import vb_terms as R

T = 1000
TIMESTEPS = [0, 1, 500, T - 1]
_DECODER = TERM_COLUMNS.index("decoder")


@pytest.fixture(scope="module")
def schedule():
    return df.NoiseSchedule.linear(T)


def _on_grid(shape, g):
    """x_0 on the 8-bit grid with both edge bins well represented."""
    k = torch.randint(0, 256, shape, generator=g)
    k = torch.where(torch.rand(shape, generator=g) < 0.3, (k % 2) * 255, k)
    return k.float() / 127.5 - 1


def _inputs(schedule, t, prediction_type, seed, shape=(3, 2, 5, 7), spread=0.1):
    """x_0, ε and an output near its target (spread 0.1: a half-trained network's error)."""
    g = torch.Generator().manual_seed(seed)
    x0, noise = _on_grid(shape, g), torch.randn(shape, generator=g)
    steps = torch.full((shape[0],), t)
    target = R.prediction_target(schedule, x0.double(), noise.double(), steps, prediction_type).float()
    return x0, noise, target + spread * torch.randn(shape, generator=g), steps


def _paper(schedule, x0, noise, out, steps, variance, clip, prediction_type, sigma1="paper"):
    return R.vb_terms(schedule, x0.double(), noise.double(), out.double(), steps, variance, clip, prediction_type, sigma1)


def _max_relative(out, ref):
    return float(((out.double().cpu() - ref) / ref.abs().clamp_min(1e-300)).abs().max())


@pytest.mark.parametrize("sigma1", ["paper", "improved-diffusion"])
@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("prediction_type", ["epsilon", "x0", "v"])
def test_rows_reproduce_the_papers_terms(schedule, sigma1, variance, clip, prediction_type):
    """The row algebra (x̂0 = x_0 + B·d, μ̃ − μ_θ = c1·err, kl_const) equals eqs. 6–7 and 13 in float64."""
    table = term_table(schedule, variance, clip, prediction_type, sigma1)
    for t in TIMESTEPS + [2, 250]:
        x0, noise, out, steps = _inputs(schedule, t, prediction_type, seed=t, spread=0.5)
        rows = R.vb_terms_row(x0, noise, out, table[t])
        paper = _paper(schedule, x0, noise, out, steps, variance, clip, prediction_type, sigma1)
        # 1e-8, not float64's 1e-15: the paper's form of the KL loses digits of its own at late timesteps,
        # where ½(log(β/β̃) + β̃/β − 1) ≈ 1.6e-13 a dimension is left after cancelling terms of order 1
        # (the table's ½(−x − log(1 − x)) keeps them); at t = 999 that is 1.4e-9 of a 4.9e-6-nat term
        assert _max_relative(rows, paper) < 1e-8, (t, rows, paper)


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("prediction_type", ["epsilon", "x0", "v"])
def test_fused_terms_match_the_paper(schedule, fused, variance, clip, prediction_type):
    """Each sample's term, x̂0 error and output error to 1e-6 relative of the float64 paper."""
    impl, device = fused
    table = term_table(schedule, variance, clip, prediction_type).to(device)
    for t in TIMESTEPS:
        for spread in (0.02, 1.0):
            x0, noise, out, steps = _inputs(schedule, t, prediction_type, seed=7 * t + 1, spread=spread)
            got = vb_terms(x0.to(device), noise.to(device), out.to(device), table[t], impl=impl)
            assert got.dtype == torch.float64 and got.shape == (3, 3)
            paper = _paper(schedule, x0, noise, out, steps, variance, clip, prediction_type)
            assert _max_relative(got, paper) < 1e-6, (t, spread, got, paper)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_outputs_are_read_in_their_dtype(schedule, fused, out_dtype):
    impl, device = fused
    table = term_table(schedule).to(device)
    for t in (0, 300):
        x0, noise, out, steps = _inputs(schedule, t, "epsilon", seed=3 + t)
        out = out.to(out_dtype)
        got = vb_terms(x0.to(device), noise.to(device), out.to(device), table[t], impl=impl)
        paper = _paper(schedule, x0, noise, out.float(), steps, "fixed_large", True, "epsilon")
        assert _max_relative(got, paper) < 1e-6


def test_layouts_and_ranks_do_not_change_the_terms(schedule, fused):
    impl, device = fused
    table = term_table(schedule).to(device)
    x0, noise, out, _ = (v.to(device) for v in _inputs(schedule, 0, "epsilon", seed=11, shape=(2, 3, 4, 6)))
    plain = vb_terms(x0, noise, out, table[0], impl=impl)
    last = [v.contiguous(memory_format=torch.channels_last) for v in (x0, noise, out)]
    strided = [torch.stack([v, torch.zeros_like(v)], dim=-1).flatten(-2)[..., ::2] for v in (x0, noise, out)]
    flat = [v.reshape(2, -1) for v in (x0, noise, out)]
    for args in (last, strided, flat):
        assert torch.allclose(vb_terms(*args, table[0], impl=impl), plain, rtol=1e-6, atol=0)


def test_a_sample_is_the_same_in_any_batch(schedule, fused):
    impl, device = fused
    table = term_table(schedule).to(device)
    x0, noise, out, _ = (v.to(device) for v in _inputs(schedule, 40, "epsilon", seed=12, shape=(5, 1, 9, 9)))
    whole = vb_terms(x0, noise, out, table[40], impl=impl)
    for j in range(5):
        assert torch.equal(vb_terms(x0[j:j + 1], noise[j:j + 1], out[j:j + 1], table[40], impl=impl), whole[j:j + 1])


def _bin_nll_by_quadrature(x0: float, mean: float, sigma: float) -> float:
    """−log ∫ N(x; mean, σ²) dx over x_0's bin (edges to ±∞), by adaptive quadrature of the density."""
    lo = -math.inf if x0 < -0.999 else x0 - 1 / 255
    hi = math.inf if x0 > 0.999 else x0 + 1 / 255
    density = stats.norm(mean, sigma).pdf
    lo, hi = max(lo, mean - 60 * sigma), min(hi, mean + 60 * sigma)  # the density is 0 in float64 beyond
    points = [p for p in (mean,) if lo < p < hi]
    mass, _ = integrate.quad(density, lo, hi, points=points or None, epsabs=0, epsrel=1e-13, limit=200)
    return -math.log(mass)


@pytest.mark.parametrize("sigma", [math.sqrt(1e-4), 0.0074, 0.05])
def test_decoder_matches_numerical_integration(fused, sigma):
    """One element a sample, so the op returns each element's −log mass: edge and inner bins, the
    mean inside, beside and far (mass ~1e-30) from the bin."""
    impl, device = fused
    x0 = torch.tensor([-1.0, 1.0, 0.0, 2 / 255 * 100 - 1, -1.0, 1.0, 2 / 255 * 30 - 1, 2 / 255 * 200 - 1])
    offsets = [0.0, 0.0, 0.0, 0.003, -0.01, 0.02, 11 * sigma, -0.004]  # x_0 − μ
    x0 = torch.cat([x0, x0])
    offsets = offsets + [o + 0.5 * sigma for o in offsets]
    err = torch.tensor(offsets)  # with ε-prediction at t = 0, c1 = 1: err = x_0 − μ = −B·(out − ε)
    row = torch.tensor([-1.0, 0.0, 1.0, 0.0, 1.0, 1 / sigma, 0.0, 1.0], dtype=torch.float64)
    noise = torch.zeros_like(x0)
    got = vb_terms(x0[:, None].to(device), noise[:, None].to(device), err[:, None].to(device), row.to(device),
                   impl=impl)[:, 0].cpu()
    for j in range(x0.numel()):
        mean = float(x0[j]) - float(torch.tensor(offsets[j], dtype=torch.float32))
        expected = _bin_nll_by_quadrature(float(x0[j]), mean, 1 / float(row[5]))
        assert abs(float(got[j]) - expected) <= 1e-6 * max(expected, 1e-2), (j, float(got[j]), expected)


def test_opcheck(schedule, fused):
    impl, device = fused
    table = term_table(schedule).to(device)
    x0, noise, out, _ = (v.to(device) for v in _inputs(schedule, 0, "epsilon", seed=5))
    op = torch.ops.ddpm_fast.vb_terms_triton if impl == "triton" else torch.ops.ddpm_fast.vb_terms
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    if device.type == "cuda" or impl != "triton":
        tests += ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(op.default, (x0, noise, out.to(torch.bfloat16), table[0]), test_utils=tests)


def test_compiles_without_graph_breaks(schedule, fused):
    impl, device = fused
    table = term_table(schedule).to(device)
    x0, noise, out, _ = (v.to(device) for v in _inputs(schedule, 9, "epsilon", seed=6))

    def f(x0, noise, out):
        return vb_terms(x0, noise, out * 1.0, table[9], impl=impl).sum(1)

    backend = "inductor" if device.type == "cuda" else "aot_eager"
    assert torch.equal(torch.compile(f, fullgraph=True, backend=backend)(x0, noise, out), f(x0, noise, out))


@pytest.mark.parametrize("impl", ["cpu", "triton", "reference"])
def test_bad_inputs(schedule, impl):
    row = term_table(schedule)[3]
    x0 = torch.zeros(2, 1, 4, 4)
    cases = [
        ((x0.double(), x0, x0, row), TypeError, "x_start and noise must be float32"),
        ((x0, x0, x0.int(), row), TypeError, "model_output must be float32, float16 or bfloat16"),
        ((x0, x0[:1], x0, row), ValueError, "must have x_start's shape"),
        ((x0, x0, x0, row[:5]), ValueError, "row must be a contiguous float64 [8]"),
        ((x0, x0, x0, row.float()), ValueError, "row must be a contiguous float64 [8]"),
        ((x0.reshape(2, 16)[:, ::2], x0.reshape(2, 16)[:, ::2], x0.reshape(2, 16)[:, ::2], row), ValueError,
         "not 4-D must be contiguous"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
            vb_terms(*args, impl=impl)


def test_raw_op_checks_its_arguments():
    x0 = torch.zeros(2, 1, 4, 4)
    with pytest.raises(RuntimeError, match="row must be a contiguous float64"):
        torch.ops.ddpm_fast.vb_terms(x0, x0, x0, torch.zeros(7, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="x_start and noise must be float32"):
        torch.ops.ddpm_fast.vb_terms(x0.double(), x0, x0, torch.zeros(8, dtype=torch.float64))


def test_term_table_refuses_an_undefined_bound():
    betas = torch.linspace(1e-4, 0.02, 10, dtype=torch.float64)
    betas[-1] = 1.0
    with pytest.raises(ValueError, match="zero terminal SNR"):
        term_table(df.NoiseSchedule(betas, zero_terminal_snr=True), prediction_type="epsilon")
    assert float(term_table(df.NoiseSchedule.linear(10))[0, _DECODER]) == 1.0
