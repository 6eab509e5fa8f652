"""Learned variances (DESIGN §2.3, Nichol & Dhariwal 2021): the learned step-table rows and the fused
step's variance_output on every backend against a float64 reference written here from the
improved-DDPM equations — eqs. 6–7 for the mean, the posterior variance β̃_t clipped as
improved-diffusion's posterior_log_variance_clipped, eq. 15 for "learned_range" — which reads the
NoiseSchedule of the (respaced) chain, never the step table it checks."""
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
from helpers import opcheck_step, relative_error

T = 1000
LEARNED = ["learned_range", "learned"]
OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last", "halves"]


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.linear(T)


def _chain(schedule, table):
    """The NoiseSchedule of the table's chain of kept timesteps (β'_t = 1 − ᾱ_t/ᾱ_s, eqs. 6-7 for
    it: Nichol & Dhariwal §4, guided-diffusion's SpacedDiffusion) and each row's index in it."""
    kept = table.timesteps.flip(0)
    if len(kept) == schedule.num_timesteps:
        return schedule, list(range(len(kept)))[::-1]
    ab = schedule.alphas_cumprod[kept]
    return NoiseSchedule(1 - ab / torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])), list(range(len(kept)))[::-1]


def p_sample_learned(chain, i, out, var, x, z, variance, clip, prediction_type, grad=None, s=0.0):
    """x_{t−1} ~ N(μ_θ + s·Σ_θ·g, Σ_θ) at the chain's index i, float64, from the equations:
    μ_θ the posterior mean at x̂0 (eqs. 6-7), log Σ_θ = frac·log β_t + (1 − frac)·log β̃_t with
    frac = (v + 1)/2 and β̃ clipped at index 0 to index 1's (eq. 15), or log Σ_θ = v; no noise at
    index 0."""
    t = torch.full((x.shape[0],), i)
    mean = D.p_mean_variance(chain, out, x, t, clip, "fixed_large", prediction_type)["mean"]
    if variance == "learned":
        log_variance = var
    else:
        beta_tilde = chain.posterior_variance[max(i, 1)].item()  # posterior_log_variance_clipped
        frac = (var + 1) / 2
        log_variance = frac * math.log(chain.betas[i].item()) + (1 - frac) * math.log(beta_tilde)
    if grad is not None:
        mean = mean + s * log_variance.exp() * grad
    return mean + (0.0 if i == 0 else 1.0) * (0.5 * log_variance).exp() * z


def _inputs(seed, shape, out_dtype, layout):
    """x, the prediction and the variance channels: contiguous, channels_last, or the two halves of
    one 2C-channel output (views, as torch.split gives them)."""
    g = torch.Generator().manual_seed(seed)
    b, c, h, w = shape
    x = torch.randn(shape, generator=g) * 1.5
    both = torch.cat([torch.randn(shape, generator=g), torch.rand(shape, generator=g) * 2 - 1], dim=1)
    both[:, c:] *= 1.2  # v slightly outside [−1, 1] too: eq. 15 extrapolates then
    both = both.to(out_dtype)
    if layout == "channels_last":
        x, both = x.to(memory_format=torch.channels_last), both.to(memory_format=torch.channels_last)
    out, var = torch.split(both, c, dim=1)
    if layout != "halves":
        out, var = out.clone(memory_format=torch.preserve_format), var.clone(memory_format=torch.preserve_format)
    return x, out, var


def _rows(table):
    return sorted({0, 1, len(table) // 2, len(table) - 2, len(table) - 1})


@pytest.mark.parametrize("variance", LEARNED)
@pytest.mark.parametrize("steps", [None, 2, 25])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("prediction_type", ["epsilon", "x0", "v"])
def test_learned_rows_reproduce_the_equations(schedule, variance, steps, clip, prediction_type):
    # float64, row by row, the full chain and respaced ones (β and β̃ of the respaced chain)
    table = schedule.step_table("ddpm", variance, clip, prediction_type, steps)
    chain, indices = _chain(schedule, table)
    x, out, var = (v.double() for v in _inputs(0, (2, 3, 5, 4), torch.float64, "contiguous"))
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for index in _rows(table):
        expected = p_sample_learned(chain, indices[index], out, var, x, z, variance, clip, prediction_type)
        got = reference_step(x, out, table.coefs[index], z, variance_output=var)
        assert relative_error(got, expected) < 1e-12, (index, int(table.timesteps[index]))


def test_learned_columns(schedule):
    # log β_t and the clipped log β̃_t of improved-diffusion; the last row's β̃ is the row before's
    table = schedule.step_table("ddpm", "learned_range")
    column = {name: table.coefs[:, STEP_COLUMNS.index(name)] for name in STEP_COLUMNS}
    assert (column["learned"] == 1).all() and (schedule.step_table("ddpm", "learned").coefs[:, 11] == 2).all()
    assert torch.allclose(column["log_beta"], schedule.betas.flip(0).log(), rtol=1e-15, atol=0)
    clipped = torch.cat([schedule.posterior_variance[1:2], schedule.posterior_variance[1:]]).log()
    assert torch.allclose(column["log_beta_tilde"], clipped.flip(0), rtol=1e-15, atol=0)
    assert (column["sigma"][:-1] == 1).all() and column["sigma"][-1] == 0  # σ·√Σ_θ·z, none at t = 0
    fixed = schedule.step_table("ddpm", "fixed_small")
    assert (fixed.coefs[:, 11:] == 0).all() and not fixed.learned and table.learned


@pytest.mark.parametrize("method", ["ddim", "dpm-solver++"])
@pytest.mark.parametrize("variance", LEARNED)
def test_ddim_and_dpm_solver_ignore_a_learned_variance(schedule, method, variance):
    kwargs = dict(steps=10, eta=0.5 if method == "ddim" else 0.0)
    assert torch.equal(schedule.step_table(method, variance, **kwargs).coefs,
                       schedule.step_table(method, "fixed_large", **kwargs).coefs)


def test_a_single_learned_step_is_refused(schedule):
    with pytest.raises(ValueError, match="at least two DDPM steps"):
        schedule.step_table("ddpm", "learned_range", steps=1)


@pytest.mark.parametrize("variance", LEARNED)
@pytest.mark.parametrize("steps", [None, 25])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v"])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fused_learned_step_matches_the_equations(schedule, fused, variance, steps, prediction_type, out_dtype, layout):
    impl, device = fused
    table = schedule.step_table("ddpm", variance, True, prediction_type, steps)
    chain, indices = _chain(schedule, table)
    on_device = table.to(device)
    shape = {"contiguous": (1, 3, 5, 7), "channels_last": (2, 5, 3, 3), "halves": (3, 3, 5, 7)}[layout]  # batch 1, odd
    x, out, var = _inputs(2, shape, out_dtype, layout)
    seed, offset = 11, 5
    for index in _rows(table):
        z = ref_noise.randn(tuple(x.shape), seed, int(table.noise_keys[index]), offset).double()
        expected = p_sample_learned(chain, indices[index], out.double(), var.double(), x.double(), z, variance, True,
                                    prediction_type)
        got = x.to(device).clone(memory_format=torch.preserve_format)
        diffusion_step_(got, out.to(device), on_device.coefs, on_device.noise_keys,
                        torch.tensor([index], device=device), seed=seed, sample_offset=offset,
                        variance_output=var.to(device), impl=impl)
        assert relative_error(got, expected) <= 1e-6, (index, int(table.timesteps[index]))


@pytest.mark.parametrize("variance", LEARNED)
@pytest.mark.parametrize("cfg", [False, True])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
def test_fused_guided_learned_step(schedule, fused, variance, cfg, out_dtype):
    # classifier guidance moves the mean by s·Σ_θ·g with Σ_θ per element (guided-diffusion's
    # condition_mean); classifier-free guidance combines the ε halves, the variance is the conditional's
    impl, device = fused
    s, w = 2.5, 1.5 if cfg else 0.0
    table = schedule.step_table("ddpm", variance, steps=50, guidance_scale=w, classifier_scale=s)
    chain, indices = _chain(schedule, table)
    on_device = table.to(device)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 5, 5, generator=g)
    both = torch.cat([torch.randn(4, 3, 5, 5, generator=g), torch.rand(4, 3, 5, 5, generator=g) * 2 - 1], 1)
    both = both.to(out_dtype)
    eps, variances = torch.split(both, 3, dim=1)
    out, uncond, var = eps[:2], eps[2:] if cfg else None, variances[:2]  # views of one 2B × 2C output
    grad = torch.randn(x.shape, generator=g)
    for index in _rows(table):
        z = ref_noise.randn(tuple(x.shape), 4, int(table.noise_keys[index]), 0).double()
        guided = out.double() if not cfg else (1 + w) * out.double() - w * uncond.double()
        expected = p_sample_learned(chain, indices[index], guided, var.double(), x.double(), z, variance, True,
                                    "epsilon", grad.double(), s)
        got = x.to(device).clone()
        diffusion_step_(got, out.to(device), on_device.coefs, on_device.noise_keys,
                        torch.tensor([index], device=device), seed=4, guidance_grad=grad.to(device),
                        uncond_output=None if uncond is None else uncond.to(device), variance_output=var.to(device),
                        impl=impl)
        assert relative_error(got, expected) <= 1e-6, index


def test_fixed_rows_ignore_the_variance_channels(schedule, fused):
    # a DDIM row given variance channels (NaN ones included) updates exactly as without them
    impl, device = fused
    table = schedule.step_table("ddim", steps=10, eta=1.0).to(device)
    x, out, var = (v.to(device) for v in _inputs(5, (2, 3, 4, 4), torch.float32, "halves"))
    var[0, 0, 0, 0] = float("nan")
    index = torch.tensor([3], device=device)
    without, given = x.clone(), x.clone()
    diffusion_step_(without, out, table.coefs, table.noise_keys, index, seed=1, impl=impl)
    diffusion_step_(given, out, table.coefs, table.noise_keys, index, seed=1, variance_output=var, impl=impl)
    assert torch.equal(given, without)


def test_a_learned_sample_is_updated_the_same_in_any_batch(schedule, fused):
    impl, device = fused
    table = schedule.step_table("ddpm", "learned_range", steps=20).to(device)
    x, out, var = (v.to(device) for v in _inputs(6, (6, 3, 4, 4), torch.float32, "halves"))
    index = torch.tensor([7], device=device)
    whole = x.clone()
    diffusion_step_(whole, out, table.coefs, table.noise_keys, index, seed=5, variance_output=var, impl=impl)
    part = x[2:5].clone()
    diffusion_step_(part, out[2:5], table.coefs, table.noise_keys, index, seed=5, sample_offset=2,
                    variance_output=var[2:5], impl=impl)
    assert torch.equal(part, whole[2:5])


@pytest.mark.parametrize("impl", ["cpu", "triton", "reference"])
def test_bad_variance_output(schedule, impl):
    table = schedule.step_table("ddpm", "learned_range", steps=10)
    coefs, keys, index = table.coefs.float(), table.noise_keys, torch.tensor([3])
    x, out, var = _inputs(7, (3, 3, 5, 7), torch.float32, "halves")
    call = lambda **kw: diffusion_step_(**{**dict(x=x.clone(), model_output=out, coefs=coefs,  # noqa: E731
                                                  noise_keys=keys, step_index=index, seed=0, impl=impl), **kw})
    with pytest.raises(ValueError, match="learned = 1.0 ≠ 0: pass variance_output, the network's variance channels"):
        call()
    for bad, match in ((var[:, :2], "model_output's shape"), (var.double(), "dtype"),
                       (var.contiguous(), "strides"), (x, "dtype")):
        with pytest.raises(ValueError, match=match):
            call(variance_output=bad)
    with pytest.raises(ValueError, match="history .* and variance_output .* never meet"):
        call(variance_output=var, history=torch.zeros_like(x))


def test_raw_op_refuses_a_learned_row_without_variance(schedule):
    table = schedule.step_table("ddpm", "learned", steps=10)
    x, out, var = _inputs(8, (2, 3, 4, 4), torch.float32, "contiguous")
    with pytest.raises(RuntimeError, match="learned-variance row .*: pass variance_output"):
        torch.ops.ddpm_fast.diffusion_step_(x, out, table.coefs.float(), table.noise_keys, torch.tensor([2]), 0, 0,
                                            None, None, None, None)
    with pytest.raises(RuntimeError, match="never meet"):
        torch.ops.ddpm_fast.diffusion_step_(x, out, table.coefs.float(), table.noise_keys, torch.tensor([2]), 0, 0,
                                            torch.zeros_like(x), None, None, var)


def test_unchecked_triton_learned_row_without_variance_writes_nan(schedule, triton_device):
    table = schedule.step_table("ddpm", "learned_range", steps=10).to(triton_device)
    x = torch.zeros(2, 3, 4, 4, device=triton_device)
    diffusion_step_(x, torch.zeros_like(x), table.coefs, table.noise_keys,
                    torch.tensor([2], device=triton_device), seed=0, impl="triton", check=False)
    assert torch.isnan(x).all()


def test_opcheck(fused, schedule):
    impl, device = fused
    table = schedule.step_table("ddpm", "learned_range", steps=20).to(device)
    x, out, var = (v.to(device) for v in _inputs(5, (2, 3, 5, 7), torch.bfloat16, "halves"))
    x = x.float()
    args = (x, out, table.coefs, table.noise_keys, torch.tensor([4], device=device), 3, 0, None, None, None, var)
    opcheck_step(impl, device, args)


def test_compiles_without_graph_breaks(fused, schedule):
    impl, device = fused
    table = schedule.step_table("ddpm", "learned_range", steps=20).to(device)
    x, out, var = (v.to(device) for v in _inputs(6, (2, 3, 5, 7), torch.float32, "contiguous"))
    index = torch.tensor([6], device=device)

    def f(x, both):
        x = x * 1.0
        eps, v = torch.split(both, 3, dim=1)
        diffusion_step_(x, eps, table.coefs, table.noise_keys, index, seed=4, variance_output=v, impl=impl,
                        check=False)
        return x + 0.0

    both = torch.cat([out, var], dim=1)
    backend = "inductor" if device.type == "cuda" else "aot_eager"
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    assert torch.equal(compiled(x, both), f(x, both))


# -- the Sampler and the CLI ---------------------------------------------------------------------

class TwoHeaded(torch.nn.Module):
    """A network with 2C output channels, as guided-diffusion's learn_sigma models: a prediction, then
    variance channels in [−1, 1], both varying with x and t."""

    def __init__(self, channels: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(channels, 2 * channels, 3, padding=1)

    def forward(self, x, t):
        h = self.conv(x) + torch.sin(t.float() / 7)[:, None, None, None]
        prediction, variance = torch.split(h, x.shape[1], dim=1)
        return torch.cat([prediction, torch.tanh(variance)], dim=1)


def _logits(x, t):  # a classifier of three classes, for classifier guidance
    return torch.stack([x.mean((1, 2, 3)), x.square().mean((1, 2, 3)), (t.float()[:, None, None, None] / 40 - x).mean((1, 2, 3))], 1)


@pytest.mark.parametrize("variance", LEARNED)
@pytest.mark.parametrize("guided", [False, True])
def test_learned_sampler_on_every_backend_equals_the_reference_loop(fused, variance, guided):
    impl, device = fused
    model = TwoHeaded().to(device)
    kwargs = dict(variance=variance, steps=12, sample_shape=(3, 5, 5), check_finite=True,
                  **(dict(classifier=_logits, classifier_scale=3.0) if guided else {}))
    labels = dict(labels=[0, 2]) if guided else {}
    schedule = NoiseSchedule.linear(40)
    got = df.Sampler(model, schedule, backend=impl, **kwargs).sample(2, seed=1, **labels)
    expected = df.Sampler(model.cpu(), schedule, backend="reference", **kwargs).sample(2, seed=1, **labels)
    assert relative_error(got, expected) < 1e-5
    fixed = df.Sampler(lambda x, t: model(x, t)[:, :3], schedule, backend="reference", steps=12,
                       sample_shape=(3, 5, 5), **(dict(classifier=_logits, classifier_scale=3.0) if guided else {}))
    assert relative_error(fixed.sample(2, seed=1, **labels), expected) > 1e-3  # the variance channels count


def test_learned_sampler_is_the_same_in_any_batch():
    # float64 network (a float32 convolution's algorithm may vary with the batch): exact to rounding
    sampler = df.Sampler(TwoHeaded().double(), NoiseSchedule.linear(30), variance="learned_range", steps=10,
                         backend="reference", sample_shape=(3, 5, 5))
    whole = sampler.sample(5, seed=3)
    parts = torch.cat([sampler.sample(2, seed=3), sampler.sample(3, seed=3, sample_offset=2)])
    assert torch.allclose(parts, whole, rtol=0, atol=1e-12)
    assert torch.allclose(sampler.sample(5, seed=3, batch_size=2), whole, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["ddim", "dpm-solver++"])
def test_ddim_and_dpm_solver_samplers_ignore_the_variance_channels(method):
    model = TwoHeaded()
    kwargs = dict(method=method, steps=6, backend="cpu", sample_shape=(3, 5, 5))
    learned = df.Sampler(model, NoiseSchedule.linear(30), variance="learned_range", **kwargs).sample(2, seed=4)
    alone = df.Sampler(lambda x, t: model(x, t)[:, :3], NoiseSchedule.linear(30), **kwargs).sample(2, seed=4)
    assert torch.equal(learned, alone)


def test_the_sampler_refuses_a_model_without_variance_channels():
    with pytest.raises(ValueError, match="needs a model with 2 output channels for 1 input channels"):
        df.Sampler(df.UNet.small(), NoiseSchedule.linear(10), variance="learned")
    sampler = df.Sampler(lambda x, t: x, NoiseSchedule.linear(10), variance="learned_range", sample_shape=(3, 4, 4))
    with pytest.raises(ValueError, match=r"shape \(1, 6, 4, 4\) \(its prediction, then the variance channels"):
        sampler.sample(1)
    with pytest.raises(ValueError, match=r"must return a tensor of shape \(1, 1, 4, 4\), got \(1, 2, 4, 4\)"):
        df.Sampler(TwoHeaded(1), NoiseSchedule.linear(10), sample_shape=(1, 4, 4)).sample(1)


def test_cli_samples_with_a_learned_variance(tmp_path):
    from ddpm_fast.cli import main
    from ddpm_fast.unet import SMALL
    torch.manual_seed(0)
    df.UNet(**{**SMALL, "out_ch": 2}).save_pretrained(tmp_path / "two.safetensors")
    argv = ["sample", "--model", str(tmp_path / "two.safetensors"), "--method", "ddpm", "--steps", "4", "--num", "2",
            "--quiet", "--out", str(tmp_path / "s.npz")]
    assert main([*argv, "--variance", "learned_range"]) == 0
    manifest = (tmp_path / "s.npz.manifest.json").read_text()
    assert '"variance": "learned_range"' in manifest
