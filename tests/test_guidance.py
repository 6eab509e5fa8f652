"""Guidance in the fused step (DESIGN §2.5): the guided table rows against the papers' formulas
(reference/guidance.py) in float64, every fused backend against the float64 row reference, the
inputs' checks, batch invariance, opcheck and compile, and the Sampler's labels and guidance."""
import pytest
import torch

import ddpm_fast as df
from ddpm_fast.classifier import classifier_gradient
from ddpm_fast.contract import STEP_COLUMNS
from ddpm_fast.ops import diffusion_step_
from ddpm_fast.reference import diffusion as D
from ddpm_fast.reference import guidance as G
from ddpm_fast.reference import noise as ref_noise
from ddpm_fast.reference.diffusion_step import diffusion_step as reference_step
from helpers import opcheck_step, relative_error

T = 1000
W, S = 2.5, 1.5  # a guidance weight and a classifier scale away from the special values 0 and 1
CONFIGS = [("ddpm", "fixed_large", 0.0), ("ddpm", "fixed_small", 0.0), ("ddim", "fixed_large", 0.0),
           ("ddim", "fixed_large", 0.5)]
OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GUIDANCE = [(True, False), (False, True), (True, True)]  # (classifier-free, classifier)


@pytest.fixture(scope="module")
def schedule():
    return df.NoiseSchedule.linear(T)


def _inputs(seed, shape=(3, 3, 5, 7), out_dtype=torch.float32):
    # x, the conditional and unconditional outputs, a classifier gradient
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 1.5
    cond, uncond = (torch.randn(shape, generator=g).to(out_dtype) for _ in range(2))
    return x, cond, uncond, torch.randn(shape, generator=g)


def _table(schedule, method, variance="fixed_large", eta=0.0, clip=True, prediction_type="epsilon", w=W, s=S):
    steps = {"ddpm": None, "ddim": 20}.get(method, 12)
    return schedule.step_table(method, variance, clip, prediction_type, steps, eta, guidance_scale=w,
                               classifier_scale=s)


@pytest.mark.parametrize("method,variance,eta", CONFIGS)
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("prediction_type", ["epsilon", "x0", "v"])
def test_guided_rows_reproduce_the_papers(schedule, method, variance, eta, clip, prediction_type):
    # float64: the row with (w, Gout, Gmean) is eq. 6 then Algorithm 1 (DDPM) or eq. 14 (DDIM)
    table = _table(schedule, method, variance, eta, clip, prediction_type)
    x, cond, uncond, grad = (v.double() for v in _inputs(0))
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for index in sorted({0, 1, len(table) // 2, len(table) - 2, len(table) - 1}):
        t = torch.full((x.shape[0],), int(table.timesteps[index]))
        out = G.classifier_free(cond, uncond, W)
        if method == "ddpm":
            expected = G.p_sample(schedule, out, x, t, z, grad, S, clip, variance, prediction_type)
        else:
            t_prev = int(table.timesteps[index + 1]) if index + 1 < len(table) else -1
            guided = G.condition_output(schedule, out, x, t, grad, S, prediction_type, clip_denoised=clip)
            # guided-diffusion's order: clip, shift ε, no second clip (condition_score, then ddim_sample)
            expected = D.ddim_step(schedule, guided, x, t, torch.full_like(t, t_prev), z, eta, False, prediction_type)
        got = reference_step(x, cond, table.coefs[index], z, uncond_output=uncond, guidance_grad=grad)
        assert relative_error(got, expected) < 1e-12, (index, int(table.timesteps[index]))


@pytest.mark.parametrize("method", ["dpm-solver++", "dpm-solver++-sde"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "x0", "v"])
def test_guided_multistep_rows_use_the_guided_output(schedule, method, prediction_type):
    # DPM-Solver++ with guidance is DPM-Solver++ on the output of eq. 6 then eq. 14 (its timesteps
    # lie on the training grid with linspace spacing, where the schedule's ᾱ_t is the row's)
    guided = _table(schedule, method, prediction_type=prediction_type)
    plain = _table(schedule, method, prediction_type=prediction_type, w=0.0, s=0.0)
    x, cond, uncond, grad = (v.double() for v in _inputs(1))
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for index in (0, 1, 6, len(guided) - 1):
        t = torch.full((x.shape[0],), int(guided.timesteps[index]))
        out = G.condition_output(schedule, G.classifier_free(cond, uncond, W), x, t, grad, S, prediction_type)
        history, expected_history = (torch.randn(x.shape, generator=torch.Generator().manual_seed(3),
                                                 dtype=torch.float64) for _ in range(2))
        expected_history.copy_(history)
        expected = reference_step(x, out, plain.coefs[index], z, expected_history)
        got = reference_step(x, cond, guided.coefs[index], z, history, uncond, grad)
        assert relative_error(got, expected) < 1e-12 and relative_error(history, expected_history) < 1e-12, index


def test_guidance_columns(schedule):
    # w per row as given; DDPM rows move the mean by s·σ_t², DDIM rows without the clip ε by
    # −s·√(1−ᾱ_t), with it x_prev by s·(1−ᾱ_t)(√ᾱ_s/√ᾱ_t − D) (ε shifted after the clip)
    w_col, gout, gmean = (STEP_COLUMNS.index(c) for c in ("w", "Gout", "Gmean"))
    ddpm = schedule.step_table("ddpm", "fixed_large", guidance_scale=[float(i % 3) for i in range(T)],
                               classifier_scale=2.0)
    assert ddpm.coefs[:, w_col].tolist() == [float(i % 3) for i in range(T)]
    assert torch.allclose(ddpm.coefs[:, gmean], 2.0 * schedule.betas.flip(0), rtol=1e-14, atol=0)
    assert (ddpm.coefs[:, gout] == 0).all()
    ddim = schedule.step_table("ddim", steps=10, clip_denoised=False, classifier_scale=2.0)
    t = ddim.timesteps
    assert torch.allclose(ddim.coefs[:, gout], -2.0 * schedule.sqrt_one_minus_alphas_cumprod[t], rtol=1e-12, atol=0)
    assert (ddim.coefs[:, gmean] == 0).all() and (ddim.coefs[:, w_col] == 0).all()
    unguided = schedule.step_table("ddim", steps=10, clip_denoised=False)
    assert torch.equal(unguided.coefs[:, :w_col], ddim.coefs[:, :w_col])
    clipped = schedule.step_table("ddim", steps=10, classifier_scale=2.0)
    ab = schedule.alphas_cumprod[t]
    ab_s = torch.cat([schedule.alphas_cumprod[t[1:]], torch.ones(1, dtype=torch.float64)])
    D = clipped.coefs[:, STEP_COLUMNS.index("D")]
    assert torch.allclose(clipped.coefs[:, gmean], 2.0 * (1 - ab) * (ab_s.sqrt() / ab.sqrt() - D), rtol=1e-12, atol=0)
    assert (clipped.coefs[:, gout] == 0).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(guidance_scale=-1.0), "guidance_scale"), (dict(guidance_scale=float("inf")), "guidance_scale"),
    (dict(guidance_scale=[1.0, 2.0]), "one per step"), (dict(classifier_scale=-0.5), "classifier_scale"),
    (dict(classifier_scale=True), "classifier_scale"), (dict(guidance_scale="2"), "guidance_scale")])
def test_bad_guidance_scales(schedule, kwargs, match):
    with pytest.raises(ValueError, match=match):
        schedule.step_table("ddim", steps=10, **kwargs)


def test_classifier_guidance_at_zero_terminal_snr_is_refused():
    betas = df.NoiseSchedule.linear(T).betas.clone()
    betas[-1] = 1.0
    schedule = df.NoiseSchedule(betas, zero_terminal_snr=True)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        schedule.step_table("ddim", prediction_type="v", steps=10, spacing="trailing", classifier_scale=1.0)


@pytest.mark.parametrize("method", ["ddpm", "ddim", "dpm-solver++"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "x0", "v"])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("cfg,clf", GUIDANCE)
def test_fused_guided_step_matches_the_reference(schedule, fused, method, prediction_type, out_dtype, cfg, clf):
    impl, device = fused
    table = _table(schedule, method, prediction_type=prediction_type, w=W if cfg else 0.0, s=S if clf else 0.0)
    on_device = table.to(device)
    x, cond, uncond, grad = _inputs(4, out_dtype=out_dtype)
    history = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).clamp(-1, 1)
    multistep = table.multistep
    seed, offset = 13, 4
    for index in sorted({0, 1, len(table) // 2, len(table) - 1}):
        z = ref_noise.randn(tuple(x.shape), seed, int(table.noise_keys[index]), offset).double()
        expected_history = history.double() if multistep else None
        expected = reference_step(x.double(), cond.double(), table.coefs[index], z, expected_history,
                                  uncond.double() if cfg else None, grad.double() if clf else None)
        got, got_history = x.to(device), history.to(device) if multistep else None
        diffusion_step_(got, cond.to(device), on_device.coefs, on_device.noise_keys,
                        torch.tensor([index], device=device), seed=seed, sample_offset=offset, history=got_history,
                        uncond_output=uncond.to(device) if cfg else None,
                        guidance_grad=grad.to(device) if clf else None, impl=impl)
        assert relative_error(got, expected) <= 1e-6, index
        if multistep:
            assert relative_error(got_history, expected_history) <= 1e-6, index


def test_guided_layouts_give_the_same_update(fused, schedule):
    # channels_last x (and grad), a channels_last or strided model output (and uncond): NCHW's result
    impl, device = fused
    table = _table(schedule, "ddim").to(device)
    x, cond, uncond, grad = (v.to(device) for v in _inputs(6, shape=(2, 4, 6, 5)))
    index = torch.tensor([7], device=device)

    def run(xx, cc, uu, gg):
        diffusion_step_(xx, cc, table.coefs, table.noise_keys, index, seed=3, uncond_output=uu, guidance_grad=gg,
                        impl=impl)
        return xx

    base = run(x.clone(), cond, uncond, grad)
    cl = torch.channels_last
    assert torch.equal(run(x.to(memory_format=cl), cond, uncond, grad.to(memory_format=cl)), base)
    assert torch.equal(run(x.clone(), cond.to(memory_format=cl), uncond.to(memory_format=cl), grad), base)
    both = torch.cat([cond, uncond])  # the halves of one 2B-batch forward, as the Sampler passes them
    assert torch.equal(run(x.clone(), both[:2], both[2:], grad), base)
    wide = torch.zeros(2, 2, 4, 6, 10, device=device)
    wide[0, ..., ::2], wide[1, ..., ::2] = cond, uncond
    assert torch.equal(run(x.clone(), wide[0, ..., ::2], wide[1, ..., ::2], grad), base)


@pytest.mark.parametrize("method", ["ddpm", "dpm-solver++-sde"])
def test_a_guided_sample_is_updated_the_same_in_any_batch(fused, schedule, method):
    # noise indexed by the sample, not by the doubled batch of classifier-free guidance
    impl, device = fused
    table = _table(schedule, method).to(device)
    x, cond, uncond, grad = (v.to(device) for v in _inputs(7, shape=(8, 3, 4, 4)))
    history = torch.randn(x.shape, generator=torch.Generator().manual_seed(8)).to(device) if table.multistep else None
    index = torch.tensor([5], device=device)
    whole, whole_history = x.clone(), None if history is None else history.clone()
    diffusion_step_(whole, cond, table.coefs, table.noise_keys, index, seed=5, history=whole_history,
                    uncond_output=uncond, guidance_grad=grad, impl=impl)
    part, part_history = x[4:7].clone(), None if history is None else history[4:7].clone()
    diffusion_step_(part, cond[4:7], table.coefs, table.noise_keys, index, seed=5, sample_offset=4,
                    history=part_history, uncond_output=uncond[4:7], guidance_grad=grad[4:7].clone(), impl=impl)
    assert torch.equal(part, whole[4:7])


@pytest.mark.parametrize("impl", ["cpu", "triton", "reference"])
def test_bad_guidance_inputs(schedule, impl):
    table = _table(schedule, "ddim")
    coefs, keys, index = table.coefs.float(), table.noise_keys, torch.tensor([3])
    x, cond, uncond, grad = _inputs(9)
    call = lambda **kw: diffusion_step_(**{**dict(x=x.clone(), model_output=cond, coefs=coefs,  # noqa: E731
                                                  noise_keys=keys, step_index=index, seed=0, impl=impl,
                                                  uncond_output=uncond, guidance_grad=grad), **kw})
    with pytest.raises(ValueError, match="w = 2.5 ≠ 0: pass uncond_output"):
        call(uncond_output=None)
    with pytest.raises(ValueError, match="Gmean = .* ≠ 0: pass guidance_grad"):
        call(guidance_grad=None)
    for kw, match in ((dict(uncond_output=uncond.half()), "model_output's dtype"),
                      (dict(uncond_output=uncond[:, :2]), "model_output's dtype"),
                      (dict(uncond_output=uncond.to(memory_format=torch.channels_last)), "strides"),
                      (dict(guidance_grad=grad.double()), "float32 with x's shape"),
                      (dict(guidance_grad=grad[:2]), "float32 with x's shape"),
                      (dict(guidance_grad=grad.to(memory_format=torch.channels_last)), "strides")):
        with pytest.raises(ValueError, match=match):
            call(**kw)
    shared = x.clone()
    for kw, match in ((dict(x=shared, guidance_grad=shared), "guidance_grad shares memory with x"),
                      (dict(x=shared, uncond_output=shared), "uncond_output shares memory with x")):
        with pytest.raises(ValueError, match=match):
            call(**kw)


def test_raw_op_checks_the_guidance_inputs(schedule):
    table = _table(schedule, "ddim")
    x, cond, uncond, grad = _inputs(10)
    with pytest.raises(RuntimeError, match="uncond_output must have model_output's dtype"):
        torch.ops.ddpm_fast.diffusion_step_(x, cond, table.coefs.float(), table.noise_keys, torch.tensor([2]), 0, 0,
                                            None, uncond.half(), grad, None)
    with pytest.raises(RuntimeError, match="guidance_grad must have x.s dtype Float"):
        torch.ops.ddpm_fast.diffusion_step_(x, cond, table.coefs.float(), table.noise_keys, torch.tensor([2]), 0, 0,
                                            None, uncond, grad.double(), None)


def test_guided_opcheck(fused, schedule):
    impl, device = fused
    table = _table(schedule, "dpm-solver++").to(device)
    x, cond, uncond, grad = (v.to(device) for v in _inputs(11, out_dtype=torch.bfloat16))
    args = (x, cond, table.coefs, table.noise_keys, torch.tensor([4], device=device), 3, 0, torch.zeros_like(x),
            uncond, grad, None)
    opcheck_step(impl, device, args)


def test_guided_step_compiles_without_graph_breaks(fused, schedule):
    impl, device = fused
    table = _table(schedule, "ddim").to(device)
    x, cond, uncond, grad = (v.to(device) for v in _inputs(12))
    index = torch.tensor([6], device=device)

    def f(x, both, grad):
        x = x * 1.0
        half = both.shape[0] // 2
        diffusion_step_(x, both[:half], table.coefs, table.noise_keys, index, seed=4, uncond_output=both[half:],
                        guidance_grad=grad, impl=impl, check=False)
        return x + 0.0

    backend = "inductor" if device.type == "cuda" else "aot_eager"
    both = torch.cat([cond, uncond])
    assert torch.equal(torch.compile(f, fullgraph=True, backend=backend)(x, both, grad), f(x, both, grad))


def test_classifier_gradient_is_the_log_probability_gradient():
    # a linear classifier: ∇ₓ log softmax(Wx)_y = W_y − Σ_k p_k W_k
    weight = torch.randn(4, 6, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    y = torch.tensor([0, 3, 1])
    with torch.inference_mode():  # as the Sampler calls it
        grad = classifier_gradient(lambda x, t: x @ weight.T, x, torch.zeros(3, dtype=torch.int64), y)
    p = torch.softmax(x @ weight.T, dim=1)
    assert torch.allclose(grad, weight[y] - p @ weight, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="logits \\[B, K\\]"):
        classifier_gradient(lambda x, t: x.sum(), x, torch.zeros(3, dtype=torch.int64), y)
    with pytest.raises(ValueError, match="outside the classifier's 4 classes"):
        classifier_gradient(lambda x, t: x @ weight.T, x, torch.zeros(3, dtype=torch.int64), torch.tensor([0, 4, 1]))


# -- the Sampler -------------------------------------------------------------------------------

def _conditional_unet(**overrides):
    torch.manual_seed(0)
    return df.UNet(**{**dict(ch=16, out_ch=1, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), in_channels=1,
                             resolution=8, num_groups=8, num_classes=3), **overrides}).eval()


def _classifier(x, t):
    # a fixed smooth classifier of three classes: logits from three fixed patterns
    patterns = torch.linspace(-1, 1, 3 * x[0].numel(), dtype=x.dtype).reshape(3, -1).sin()
    return x.flatten(1) @ patterns.T * (1 + t.to(x.dtype)[:, None] / 1000)


@pytest.mark.parametrize("method", ["ddpm", "ddim", "dpm-solver++"])
def test_guided_sampling_is_the_reference_sampler(method):
    # the fused CPU step (classifier-free and classifier guidance together) against the reference
    # backend's loop (reference_step), the same network outputs and noise
    model = _conditional_unet()
    kwargs = dict(method=method, steps=None if method == "ddpm" else 8, guidance_scale=2.0, classifier=_classifier,
                  classifier_scale=0.5)
    schedule = df.NoiseSchedule.linear(40)
    fused = df.Sampler(model, schedule, backend="cpu", **kwargs).sample(3, seed=1, labels=[0, 2, 1])
    reference = df.Sampler(model, schedule, backend="reference", **kwargs).sample(3, seed=1, labels=[0, 2, 1])
    assert relative_error(fused, reference) < 1e-5
    unguided = df.Sampler(model, schedule, backend="cpu", method=method, steps=kwargs["steps"]).sample(
        3, seed=1, labels=[0, 2, 1])
    assert relative_error(unguided, fused) > 1e-2  # guidance changes the samples


def test_a_guided_sample_is_the_same_in_any_batch():
    # sample j with label y: the same whatever batch draws it (float64 network: exact to rounding)
    model = _conditional_unet().double()
    sampler = df.Sampler(model, df.NoiseSchedule.linear(30), method="ddim", steps=6, backend="reference",
                         guidance_scale=1.5, classifier=_classifier)
    labels = [2, 0, 1, 1, 0]
    whole = sampler.sample(5, seed=3, labels=labels)
    parts = torch.cat([sampler.sample(2, seed=3, labels=labels[:2]),
                       sampler.sample(3, seed=3, sample_offset=2, labels=labels[2:])])
    assert torch.allclose(whole, parts, rtol=0, atol=1e-12)
    assert torch.allclose(sampler.sample(5, seed=3, labels=labels, batch_size=2), whole, rtol=0, atol=1e-12)


def test_classifier_free_guidance_runs_the_network_once_on_the_2b_batch():
    calls = []

    class Recorded(df.UNet):
        def forward(self, x, t, y=None):
            calls.append((x.shape[0], t.tolist(), y.tolist()))
            return super().forward(x, t, y)

    torch.manual_seed(0)
    model = Recorded(ch=16, out_ch=1, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), in_channels=1,
                     resolution=8, num_groups=8, num_classes=3).eval()
    sampler = df.Sampler(model, df.NoiseSchedule.linear(20), method="ddim", steps=4, guidance_scale=3.0)
    sampler.sample(2, labels=[1, 2])
    assert len(calls) == 4
    for (batch, t, y), step in zip(calls, sampler.timesteps):
        assert batch == 4 and t == [step] * 4 and y == [1, 2, 3, 3]  # labels, then ∅ = K = 3


def test_one_guided_step_adds_no_kernel_to_combine(monkeypatch):
    # One step of the stepper under the profiler: outside the network, classifier-free guidance adds
    # the copy of x into the network's 2B input and nothing else; the combination of the halves
    # happens inside the one fused update (ddpm_fast::diffusion_step_).
    model = _conditional_unet()

    def top_level_ops(guidance_scale):
        sampler = df.Sampler(model, df.NoiseSchedule.linear(20), method="ddim", steps=4, backend="cpu",
                             guidance_scale=guidance_scale)
        with torch.inference_mode():
            _, step = sampler.stepper(2, labels=[0, 1])
            step()  # warm
            network = model.forward
            monkeypatch.setattr(model, "forward", lambda *a: _within("network", network, *a))
            with torch.profiler.profile() as prof:
                step()
            monkeypatch.undo()
        views = {"aten::slice", "aten::expand", "aten::view", "aten::as_strided", "aten::alias", "aten::select"}
        names = [e.name for e in prof.events() if e.cpu_parent is None and e.name not in views]
        return {name: names.count(name) for name in names}

    plain, guided = top_level_ops(0.0), top_level_ops(2.0)
    assert guided.pop("aten::cat") == plain.pop("aten::cat", 0) + 1  # x twice: the network's input
    assert guided == plain, (plain, guided)
    assert guided["ddpm_fast::diffusion_step_"] == 1 and guided["network"] == 1


def _within(name, function, *args):
    with torch.profiler.record_function(name):
        return function(*args)


def test_sampler_guidance_arguments_are_checked():
    schedule = df.NoiseSchedule.linear(20)
    conditional, unconditional = _conditional_unet(), df.UNet.small()
    with pytest.raises(ValueError, match="class-conditional UNet"):
        df.Sampler(unconditional, schedule, guidance_scale=1.0)
    with pytest.raises(ValueError, match="pass classifier="):
        df.Sampler(conditional, schedule, classifier_scale=2.0)
    with pytest.raises(TypeError, match="callable"):
        df.Sampler(conditional, schedule, classifier="digits-classifier")
    with pytest.raises(ValueError, match="guidance_scale"):
        df.Sampler(conditional, schedule, method="ddim", steps=4, guidance_scale=[1.0, 2.0])
    sampler = df.Sampler(conditional, schedule, method="ddim", steps=4, guidance_scale=[0.0, 1.0, 2.0, 0.5])
    with pytest.raises(ValueError, match="pass labels="):
        sampler.sample(2)
    for labels, error, match in (([0, 1, 2], ValueError, "one per sample"), ([0, 3], ValueError, r"\[0, 3\)"),
                                 ([-1, 0], ValueError, r"\[0, 3\)"), ([0.5, 1.0], TypeError, "integer")):
        with pytest.raises(error, match=match):
            sampler.sample(2, labels=labels)
    assert sampler.sample(2, labels=1).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="unconditional and there is no classifier"):
        df.Sampler(unconditional, schedule, method="ddim", steps=2).sample(1, labels=0)
    guided = df.Sampler(unconditional, schedule, method="ddim", steps=2, classifier=_classifier)
    assert guided.sample(2, labels=[0, 2]).shape == (2, 1, 16, 16)
    with pytest.raises(ValueError, match="outside the classifier's 3 classes"):
        guided.sample(1, labels=[5])
