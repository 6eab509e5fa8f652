"""Sampler: the public API of DESIGN §9, the noise keys of §3, and every backend's loop
against the reference loop."""
import contextlib
import warnings

import pytest
import torch

import ddpm_fast as df
from ddpm_fast.reference import diffusion as D
from helpers import cuda_or_skip, relative_error, ulp_distance

SMALL = dict(ch=16, out_ch=1, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1,
             in_channels=1, resolution=8, num_groups=8)


class Recorder(torch.nn.Module):
    """ε_θ = a fixed function of (x, t) that remembers its inputs."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.3))
        self.calls = []

    def forward(self, x, t):
        self.calls.append((x.clone(), t.clone()))
        return self.scale * torch.tanh(x) + 1e-3 * t.to(x.dtype)[:, None, None, None]


def _small_model(seed=0):
    torch.manual_seed(seed)
    model = df.UNet(**SMALL)
    with torch.no_grad():  # leave the near-zero init so samples depend on the weights
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_ancestral_loop_uses_the_documented_noise_keys():
    T, n = 5, 3
    schedule = df.NoiseSchedule.linear(T, 0.1, 0.3)
    model = Recorder()
    x0 = df.Sampler(model, schedule, sample_shape=(2, 3, 3), variance="fixed_small",
                    backend="reference").sample(n, seed=7, sample_offset=4)
    x = df.randn((n, 2, 3, 3), seed=7, step=T, sample_offset=4, impl="reference")
    assert torch.equal(model.calls[0][0], x)  # x_T = randn(step=T)
    for i in reversed(range(T)):
        t = torch.full((n,), i)
        assert torch.equal(model.calls[T - 1 - i][1], t)
        noise = df.randn(x.shape, seed=7, step=i, sample_offset=4, impl="reference") if i > 0 else None
        x = D.p_sample(schedule, model(x, t), x, t, noise, clip_denoised=True, variance="fixed_small")
    assert relative_error(x0, x) < 1e-6


def test_fused_loop_draws_the_same_initial_noise():
    model = Recorder()
    df.Sampler(model, df.NoiseSchedule.linear(3), sample_shape=(2, 3, 3), backend="cpu").sample(2, seed=7)
    assert ulp_distance(model.calls[0][0], df.randn((2, 2, 3, 3), seed=7, step=3, impl="reference")).max() <= 4
    assert [int(t[0]) for _, t in model.calls] == [2, 1, 0]


def test_ddim_loop_visits_the_subsequence():
    schedule = df.NoiseSchedule.linear(100)
    model = Recorder()
    sampler = df.Sampler(model, schedule, method="ddim", steps=4, eta=1.0, sample_shape=(1, 2, 2))
    sampler.sample(2, seed=0)
    assert [int(t[0]) for _, t in model.calls] == [75, 50, 25, 0] == sampler.timesteps


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_samples_do_not_depend_on_the_batch(backend):
    sampler = df.Sampler(_small_model(), df.NoiseSchedule.linear(50), backend=backend)
    whole = sampler.sample(8, seed=3)
    assert whole.shape == (8, 1, 8, 8) and whole.dtype == torch.float32
    assert whole.min() >= -1 and whole.max() <= 1  # clipped x̂_0 at the last step
    halves = torch.cat([sampler.sample(4, seed=3), sampler.sample(4, seed=3, sample_offset=4)])
    assert relative_error(halves, whole) <= 1e-5
    assert relative_error(sampler.sample(8, seed=3, batch_size=3), whole) <= 1e-5
    assert torch.equal(sampler.sample(8, seed=3), whole)
    assert not torch.allclose(sampler.sample(8, seed=4), whole)


@pytest.mark.parametrize("method,kwargs,T", [("ddpm", {}, 200), ("ddpm", dict(variance="fixed_small"), 200),
                                             ("ddim", dict(steps=20, eta=0.5), 1000),
                                             ("ddim", dict(steps=10, eta=0.0, clip_denoised=False), 1000),
                                             ("ddpm", dict(steps=25, variance="fixed_small"), 1000)])  # respaced
def test_fused_cpu_sampler_equals_the_reference_sampler(method, kwargs, T):
    schedule = df.NoiseSchedule.linear(T)
    fused = df.Sampler(_small_model(), schedule, method=method, backend="cpu", **kwargs).sample(4, seed=9)
    reference = df.Sampler(_small_model(), schedule, method=method, backend="reference", **kwargs).sample(4, seed=9)
    assert relative_error(fused, reference) <= 1e-5


def test_triton_sampler_equals_the_reference_sampler(triton_device):
    schedule = df.NoiseSchedule.linear(1000)
    kwargs = dict(method="ddim", steps=4, eta=1.0)
    model = _small_model().to(triton_device)
    fused = df.Sampler(model, schedule, backend="triton", **kwargs).sample(3, seed=2)
    reference = df.Sampler(_small_model(), schedule, backend="reference", **kwargs).sample(3, seed=2)
    assert relative_error(fused, reference) <= 1e-5


def test_cuda_graph_loop_without_host_syncs(device):
    if device.type != "cuda":
        pytest.skip("CUDA graphs and sync checks need a GPU")
    schedule = df.NoiseSchedule.linear(1000)
    model = _small_model().to(device)
    plain = df.Sampler(model, schedule, cuda_graph=False).sample(4, seed=1)
    # the loop alone: sample()'s closing finite check is its one device read (the test below)
    sampler = df.Sampler(model, schedule, check_finite=False)
    sampler.sample(4, seed=1)  # warm-up: cuDNN and Triton pick their kernels
    with _syncs_raise():
        graphed = sampler.sample(4, seed=1, progress=True)
    assert relative_error(graphed, plain) <= 1e-6
    for backend in ("cuda", "reference"):
        other = df.Sampler(model, schedule, backend=backend).sample(4, seed=1)
        assert relative_error(other, plain) <= 1e-5, backend


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_graph_loop_in_low_precision_without_host_syncs(dtype):
    # float32 is test_cuda_graph_loop_without_host_syncs; the CPU's low precision, the test below
    device = cuda_or_skip()
    schedule = df.NoiseSchedule.linear(20)
    reference = df.Sampler(_small_model(), schedule, method="ddim", steps=10, backend="reference").sample(4, seed=1)
    sampler = df.Sampler(_small_model().to(device), schedule, method="ddim", steps=10, dtype=dtype,
                         check_finite=False)
    sampler.sample(4, seed=1)  # warm-up: cuDNN and Triton pick their kernels
    with _syncs_raise():
        graphed = sampler.sample(4, seed=1)
    # measured 1.3e-3 on a GPU; the bound is about 4× that (it was 5%)
    assert graphed.dtype == torch.float32 and relative_error(graphed, reference) < 5e-3


@contextlib.contextmanager
def _syncs_raise():
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_the_closing_finite_check_is_one_device_read_and_catches_nan():
    device = cuda_or_skip()
    schedule = df.NoiseSchedule.linear(1000)
    sampler = df.Sampler(_small_model().to(device), schedule, method="ddim", steps=10)
    sampler.sample(4, seed=1)  # warm-up
    torch.cuda.set_sync_debug_mode("warn")  # each device read warns
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sampler.sample(4, seed=1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
    exploding = df.Sampler(Exploding().to(device), df.NoiseSchedule.linear(20), sample_shape=(1, 2, 2))
    with pytest.raises(FloatingPointError, match="2 of 2 samples hold NaN"):
        exploding.sample(2)


def test_stepper_takes_the_samplers_steps_one_by_one(device):
    model = _small_model().to(device).eval()
    sampler = df.Sampler(model, df.NoiseSchedule.linear(10), method="ddim", steps=5, eta=1.0)
    expected = sampler.sample(3, seed=4, sample_offset=2)
    with torch.inference_mode():
        x, step = sampler.stepper(3, seed=4, sample_offset=2)
        for _ in range(5):
            step()
        with pytest.raises(IndexError, match="all 5 steps"):
            step()  # the kernel would read past the table
    assert relative_error(x, expected) <= 1e-6
    with pytest.raises(ValueError, match="fused backends"):
        df.Sampler(model, df.NoiseSchedule.linear(10), backend="reference").stepper(3)


class Exploding(Recorder):
    def forward(self, x, t):
        return torch.where(t[:, None, None, None] < 7, float("nan"), super().forward(x, t))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_stop_at_the_first_non_finite_step(backend):
    sampler = df.Sampler(Exploding(), df.NoiseSchedule.linear(20), sample_shape=(1, 2, 2), backend=backend,
                         finite_check_every=5)
    with pytest.raises(FloatingPointError, match="after the update at timestep 6 .step 14 of 20"):
        sampler.sample(2)
    assert len(sampler.model.calls) == 15  # noticed at the next multiple of 5, not at the end


def test_model_runs_in_eval_mode_without_autograd_and_is_restored():
    model = _small_model().train()
    sampler = df.Sampler(model, df.NoiseSchedule.linear(20), method="ddim", steps=5)
    a, b = sampler.sample(2, seed=0), sampler.sample(2, seed=0)
    assert torch.equal(a, b)  # dropout is off
    assert not a.requires_grad and model.training


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model_keeps_x_in_float32(dtype):
    model = _small_model()
    reference = df.Sampler(_small_model(), df.NoiseSchedule.linear(20), method="ddim", steps=10).sample(4, seed=1)
    low = df.Sampler(model, df.NoiseSchedule.linear(20), method="ddim", steps=10, dtype=dtype).sample(4, seed=1)
    assert low.dtype == torch.float32 and next(model.parameters()).dtype == dtype
    # measured on the CPU (torch 2.14): fp16 1.73e-4, bf16 1.21e-3 (a zero model scores 0.175); the
    # bounds are about 3× those, well inside DESIGN §6's 1e-2
    bound = {torch.float16: 5e-4, torch.bfloat16: 4e-3}[dtype]
    assert ((low - reference).norm() / reference.norm()) < bound


def test_float64_sampling():
    # the values, not only the dtype: the paper's loop (p_sample, eq. 11 with the clip) run by hand
    # in float64 on the same float64 network and the contract's noise
    schedule, model = df.NoiseSchedule.linear(10), _small_model()
    out = df.Sampler(model, schedule, dtype=torch.float64, backend="reference").sample(2, seed=0)
    assert out.dtype == torch.float64 and next(model.parameters()).dtype == torch.float64
    x = df.randn((2, 1, 8, 8), seed=0, step=10, impl="reference").double()
    with torch.no_grad():
        for i in reversed(range(10)):
            t = torch.full((2,), i)
            noise = df.randn(x.shape, seed=0, step=i, impl="reference").double() if i > 0 else None
            x = D.p_sample(schedule, model.eval()(x, t), x, t, noise, clip_denoised=True, variance="fixed_large")
    assert relative_error(out, x) < 1e-12
    single = df.Sampler(_small_model(), schedule, backend="reference").sample(2, seed=0)
    assert 0 < relative_error(single, out) < 1e-5  # the float32 run: the same samples, float32's rounding


def test_default_dtype_is_the_models_own_and_leaves_it_alone():
    # dtype=None: a float64 model samples in float64 on the reference backend, unconverted,
    # and can still be called by hand afterwards
    model = _small_model().double()
    schedule = df.NoiseSchedule.linear(10)
    sampler = df.Sampler(model, schedule, backend="reference")
    out = sampler.sample(2, seed=0)
    assert sampler.dtype == torch.float64 and out.dtype == torch.float64
    assert next(model.parameters()).dtype == torch.float64
    model.eval()(torch.zeros(1, 1, 8, 8, dtype=torch.float64), torch.tensor([3]))
    # same samples as the float32 copy sampled in float32, to float32 accuracy
    single = df.Sampler(_small_model(), schedule, backend="reference").sample(2, seed=0)
    assert single.dtype == torch.float32 and relative_error(single, out) < 1e-5
    # a bfloat16 model runs in bfloat16, x in float32
    low = _small_model().to(torch.bfloat16)
    sampler = df.Sampler(low, schedule, method="ddim", steps=5)
    assert sampler.dtype == torch.bfloat16 and sampler.sample(2, seed=0).dtype == torch.float32
    assert next(low.parameters()).dtype == torch.bfloat16
    # a callable that is not an nn.Module gets float32 inputs
    seen = []
    df.Sampler(lambda x, t: seen.append(x.dtype) or torch.zeros_like(x), schedule, sample_shape=(1, 4, 4)).sample(1)
    assert set(seen) == {torch.float32}


@pytest.mark.parametrize("backend", ["auto", "cpu", "triton"])
def test_float64_model_on_a_fused_backend_is_refused(backend):
    model = _small_model().double()
    with pytest.raises(ValueError, match="float64 model .*backend='reference'"):
        df.Sampler(model, df.NoiseSchedule.linear(10), backend=backend)
    assert next(model.parameters()).dtype == torch.float64


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(method="plms"), ValueError, "method"), (dict(variance="learned"), ValueError, "variance"),
    (dict(method="ddim", eta=1.5), ValueError, "eta"), (dict(steps=0), ValueError, "steps must be"),
    (dict(eta=0.5), ValueError, "use method='ddim'"), (dict(backend="tpu"), ValueError, "backend"),
    (dict(dtype=torch.float64), ValueError, "backend='reference'"), (dict(dtype=torch.int8), ValueError, "dtype"),
    (dict(finite_check_every=0), ValueError, "finite_check_every"),
    (dict(prediction_type="score"), ValueError, "prediction_type"),
    (dict(method="ddim", steps=0), ValueError, "steps"),
])
def test_bad_sampler_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        df.Sampler(_small_model(), df.NoiseSchedule.linear(20), **kwargs)


def test_bad_sample_calls():
    sampler = df.Sampler(_small_model(), df.NoiseSchedule.linear(5))
    for n in (0, -1, 2.0):
        with pytest.raises(ValueError, match="num_samples"):
            sampler.sample(n)
    with pytest.raises(ValueError, match="batch_size"):
        sampler.sample(2, batch_size=0)
    with pytest.raises(ValueError, match="seed"):
        sampler.sample(2, seed=-1)
    with pytest.raises(TypeError, match="NoiseSchedule"):
        df.Sampler(_small_model(), [0.1, 0.2])
    with pytest.raises(ValueError, match="sample_shape"):
        df.Sampler(lambda x, t: x, df.NoiseSchedule.linear(5))
    wrong = df.Sampler(lambda x, t: x[:, :1], df.NoiseSchedule.linear(5), sample_shape=(2, 4, 4))
    with pytest.raises(ValueError, match="shape"):
        wrong.sample(1)


def test_progress_bar(capsys):
    df.Sampler(_small_model(), df.NoiseSchedule.linear(5)).sample(2, progress=True, batch_size=1)
    assert "10/10" in capsys.readouterr().err
