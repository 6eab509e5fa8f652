"""The fused GroupNorm + SiLU (ops.group_norm_silu) on every backend against
F.silu(F.group_norm(x + add)·(1 + scale) + shift) in float64 (DESIGN §6): seeded random shapes,
layouts and dtypes, with and without the add and guided-diffusion's scale-shift, the multi-pass
path of groups too large for the chip, fp16 overflow, gradients, torch.library checks,
torch.compile, the U-Net built on it, and bad inputs."""
import random

import pytest
import torch
import torch.nn.functional as F

from ddpm_fast import UNet
from ddpm_fast.kernels import group_norm_silu as triton_kernels
from ddpm_fast.ops import group_norm_silu
from helpers import cuda_or_skip, relative_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last", "strided"]
SIZES = [1, 2, 3, 5, 7, 8, 9, 16, 32, 64]


def _interpreted(impl, device):
    return impl == "triton" and device.type == "cpu"


def _scale_shift(h, scale, shift):
    """h·(1 + scale) + shift in h's dtype, scale and shift [N, C] or None (guided-diffusion's ResBlock)."""
    if scale is not None:
        h = h * (1 + scale.to(h)[:, :, None, None])
    return h if shift is None else h + shift.to(h)[:, :, None, None]


def _reference(x, weight, bias, num_groups, add=None, act=True, eps=1e-6, scale=None, shift=None):
    """F.silu(F.group_norm(x + add)·(1 + scale) + shift) in float64 on the CPU."""
    x, weight, bias = (t.double().cpu() for t in (x, weight, bias))
    if add is not None:
        x = x + add.double().cpu()[:, :, None, None]
    h = _scale_shift(F.group_norm(x, num_groups, weight, bias, eps), scale, shift)
    return F.silu(h) if act else h


def _layout(x, layout):
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # a view with gaps in every dimension but the batch
        wide = torch.zeros(x.shape[0], 2 * x.shape[1], x.shape[2], 2 * x.shape[3], dtype=x.dtype, device=x.device)
        wide[:, ::2, :, ::2] = x
        return wide[:, ::2, :, ::2]
    return x.contiguous()


def _inputs(shape, num_groups, dtype, device, layout="contiguous", with_add=True, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    N, C = shape[:2]
    x = (torch.randn(shape, generator=g) * scale + 0.5).to(dtype)
    weight = (1 + 0.5 * torch.randn(C, generator=g)).to(dtype)
    bias = (0.5 * torch.randn(C, generator=g)).to(dtype)
    add = torch.randn(N, C, generator=g).to(dtype) if with_add else None
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return _layout(x.to(device), layout), to(weight), to(bias), to(add)


SCALE_SHIFT = ["scale", "shift", "both"]


def _scale_shift_inputs(shape, dtype, device, which, seed):
    """(scale, shift) [N, C] as `which` asks, the other None; scale of magnitude ~0.5 around 0, as a
    time embedding's projection gives, so that 1 + scale keeps the sign of most channels but not all."""
    g = torch.Generator().manual_seed(seed)
    scale, shift = (0.5 * torch.randn(shape[:2], generator=g) for _ in range(2))
    return (scale.to(device, dtype) if which in ("scale", "both") else None,
            shift.to(device, dtype) if which in ("shift", "both") else None)


def _random_cases(seed, count, max_numel, dtypes=DTYPES, scale_shift=(None,)):
    """Seeded draws: batch 1–8, groups 1, 8 or 32 with C any multiple, H, W in 1..64 (odd
    sizes included), each layout and dtype in turn, with and without the add and the SiLU, and
    each of `scale_shift` in turn (None, or _scale_shift_inputs' `which`)."""
    rng = random.Random(seed)
    cases = []
    while len(cases) < count:
        groups = rng.choice([1, 8, 32])
        shape = (rng.randint(1, 8), groups * rng.randint(1, 3), rng.choice(SIZES), rng.choice(SIZES))
        if shape[0] * shape[1] * shape[2] * shape[3] > max_numel:
            continue
        i = len(cases)
        cases.append((shape, groups, dtypes[i % len(dtypes)], LAYOUTS[(i // len(dtypes)) % 3], rng.random() < 0.7,
                      rng.random() < 0.8, scale_shift[i % len(scale_shift)]))
    return cases


def _case_id(case):
    shape, groups, dtype, layout, with_add, act, which = case
    return f"{'x'.join(map(str, shape))}-g{groups}-{str(dtype)[6:]}-{layout}-{'add' if with_add else 'noadd'}-" \
           f"{'silu' if act else 'id'}" + (f"-{which}" if which else "")


def _check_forward(impl, device, shape, groups, dtype, layout, with_add, act, which=None, seed=0, eps=1e-6):
    x, weight, bias, add = _inputs(shape, groups, dtype, device, layout, with_add, seed)
    scale, shift = _scale_shift_inputs(shape, dtype, device, which, seed + 1)
    out = group_norm_silu(x, weight, bias, groups, eps, add=add, act=act, impl=impl, scale=scale, shift=shift)
    assert out.dtype == dtype and out.shape == x.shape and out.device == x.device
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    else:
        assert out.is_contiguous()
    _assert_matches_reference(out, x, weight, bias, groups, add, act, scale, shift, eps)


def _assert_matches_reference(out, x, weight, bias, groups, add, act, scale=None, shift=None, eps=1e-6):
    dtype = x.dtype
    expected = _reference(x, weight, bias, groups, add, act, eps, scale, shift)
    err = relative_error(out, expected)
    if dtype == torch.float64:
        assert err < 1e-12, err
    elif dtype == torch.float32:
        assert err < 1e-5, err
    else:  # DESIGN §6: below 1e-2, or at most twice the error of the reference run in dtype
        low = F.group_norm(x.cpu().float() + (0 if add is None else add.cpu().float()[:, :, None, None]), groups,
                           weight.cpu().float(), bias.cpu().float(), eps)
        low = _scale_shift(low, scale, shift)
        low = (F.silu(low) if act else low).to(dtype)
        assert err < 1e-2 or err <= 2 * relative_error(low, expected), err


# then guided-diffusion's scale-shift: scale only, shift only or both in turn (float64 too on the CPU)
CPU_CASES = (_random_cases(seed=1, count=36, max_numel=1 << 20)
             + _random_cases(seed=5, count=30, max_numel=1 << 19, dtypes=DTYPES + [torch.float64],
                             scale_shift=SCALE_SHIFT))
INTERPRETER_CASES = (_random_cases(seed=2, count=12, max_numel=1200)
                     + _random_cases(seed=6, count=9, max_numel=1200, scale_shift=SCALE_SHIFT))


@pytest.mark.parametrize("case", CPU_CASES, ids=_case_id)
def test_cpu_op_matches_group_norm_silu(case):
    _check_forward("cpu", torch.device("cpu"), *case)


@pytest.mark.parametrize("case", INTERPRETER_CASES, ids=_case_id)
def test_triton_matches_group_norm_silu(triton_device, case):
    _check_forward("triton", triton_device, *case)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [case for case in CPU_CASES if case[2] != torch.float64], ids=_case_id)
def test_cuda_op_matches_group_norm_silu(case):
    _check_forward("cuda", cuda_or_skip(), *case)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_groups_of_small_variance_where_eps_matters(fused, dtype, layout):
    # group standard deviations 1e-3 (variance = eps = 1e-6), 3e-4 (below eps), 0 (a constant
    # group: SiLU(bias), no NaN) and 1: where eps sits decides the output (1/√(σ² + eps) against
    # 1/(σ + eps) differs by 41% at σ² = eps), which inputs of variance ≈ 4 cannot show
    impl, device = fused
    g = torch.Generator().manual_seed(0)
    std = torch.tensor([1e-3, 3e-4, 0.0, 1.0]).repeat_interleave(2)
    x = torch.randn(2, 8, 5, 7, generator=g) * std[None, :, None, None]
    weight, bias = 1 + 0.5 * torch.randn(8, generator=g), 0.5 * torch.randn(8, generator=g)
    x, weight, bias = _layout(x.to(dtype).to(device), layout), weight.to(dtype).to(device), bias.to(dtype).to(device)
    out = group_norm_silu(x, weight, bias, 4, eps=1e-6, impl=impl)
    assert torch.isfinite(out).all()
    _assert_matches_reference(out, x, weight, bias, 4, None, True)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_triton_channel_chunks(triton_device, monkeypatch, layout):
    # groups of 4 channels × 15 positions against a chunk of 2 elements: the forward's three sweeps and
    # the backward's two run over channel chunks as well as position chunks
    monkeypatch.setattr(triton_kernels, "ON_CHIP_ELEMENTS", 16)
    monkeypatch.setattr(triton_kernels, "CHUNK_ELEMENTS", 2)
    assert triton_kernels._blocks((2, 8, 5, 3), 2, 16) == (2, 1, False)
    _check_forward("triton", triton_device, (2, 8, 5, 3), 2, torch.float32, layout, True, True)
    _check_gradients("triton", triton_device, torch.float32, layout, 1e-5, groups=2)


# The CPU kernel's blocks (csrc/cpu/group_norm_silu.cpp): several small NCHW groups per block
# (4×4, 8×8, odd 3×5 and 9×9 with lane remainders), NHWC runs of 64 channels (several per
# sample, a batch of 1 included) or the whole sample when C is narrower, in every dtype.
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,groups", [((1, 256, 4, 4), 32), ((3, 256, 8, 8), 32), ((2, 96, 3, 5), 32),
                                          ((1, 192, 9, 9), 8), ((1, 48, 4, 4), 8)],
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else f"g{v}")
def test_cpu_op_block_partitions(shape, groups, layout, dtype):
    _check_forward("cpu", torch.device("cpu"), shape, groups, dtype, layout, True, True)
    if dtype == torch.float32:
        _check_gradients("cpu", torch.device("cpu"), dtype, layout, 1e-5, shape, groups)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpu_op_group_too_large_for_the_chip(layout):
    # LSUN-256: 128 channels at 256×256, 32 groups, i.e. 4 channels × 65,536 positions per group
    _check_forward("cpu", torch.device("cpu"), (1, 128, 256, 256), 32, torch.float32, layout, True, True)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_multi_pass_path(triton_device, monkeypatch, layout, dtype):
    # groups of 4 × 63 elements against an on-chip limit of 64: three sweeps of 8-position chunks
    monkeypatch.setattr(triton_kernels, "ON_CHIP_ELEMENTS", 64)
    monkeypatch.setattr(triton_kernels, "CHUNK_ELEMENTS", 32)
    assert not triton_kernels._blocks((1, 8, 7, 9), 2, triton_kernels.ON_CHIP_ELEMENTS)[2]
    _check_forward("triton", triton_device, (2, 8, 7, 9), 2, dtype, layout, True, True)


@pytest.mark.gpu
def test_cuda_op_group_too_large_for_shared_memory():
    _check_forward("cuda", cuda_or_skip(), (2, 128, 256, 256), 32, torch.float32, "channels_last", True, True)


def test_fp16_magnitudes_around_300_stay_finite(fused):
    # x² reaches 9·10⁴ > 65504: statistics must not be taken in float16
    impl, device = fused
    x, weight, bias, add = _inputs((2, 16, 6, 5), 8, torch.float16, device, scale=300.0)
    out = group_norm_silu(x, weight, bias, 8, add=add * 100, impl=impl)
    assert torch.isfinite(out).all()
    assert relative_error(out, _reference(x, weight, bias, 8, add * 100)) < 1e-2


def _check_gradients(impl, device, dtype, layout, tolerance, shape=(2, 8, 5, 3), groups=4, with_add=True, act=True,
                     which=None):
    """Gradients of every input (x, weight, bias, and add, scale, shift where given) through the op
    against autograd through the float64 reference, each within `tolerance`, in the inputs' dtypes."""
    x, weight, bias, add = _inputs(shape, groups, dtype, device, layout, with_add, seed=3)
    scale, shift = _scale_shift_inputs(shape, dtype, device, which, seed=5)
    named = {name: t for name, t in dict(x=x, weight=weight, bias=bias, add=add, scale=scale, shift=shift).items()
             if t is not None}
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(4)).to(dtype).to(device)

    def run(op, leaves):
        per_sample = {name: leaves.get(name) for name in ("add", "scale", "shift")}
        out = op(leaves["x"], leaves["weight"], leaves["bias"], per_sample)
        return torch.autograd.grad(out, list(leaves.values()), grad_out.to(out))

    leaves = {name: t.detach().requires_grad_() for name, t in named.items()}
    grads = run(lambda x, w, b, kw: group_norm_silu(x, w, b, groups, act=act, impl=impl, **kw), leaves)
    ref_leaves = {name: t.detach().double().cpu().requires_grad_() for name, t in named.items()}
    ref_grads = run(lambda x, w, b, kw: _reference(x, w, b, groups, act=act, **kw), ref_leaves)
    for name, got, want in zip(named, grads, ref_grads):
        assert got.dtype == dtype and got.shape == want.shape and got.device == device, name
        assert relative_error(got, want) < tolerance, name
    return grads


@pytest.mark.parametrize("which", [None] + SCALE_SHIFT)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("with_add,act", [(True, True), (False, True), (True, False)])
def test_gradients_match_autograd_through_the_reference(fused, layout, with_add, act, which):
    impl, device = fused
    grad_x = _check_gradients(impl, device, torch.float32, layout, 1e-5, with_add=with_add, act=act, which=which)[0]
    assert grad_x.is_contiguous(memory_format=torch.channels_last if layout == "channels_last"
                                else torch.contiguous_format)


@pytest.mark.parametrize("which", [None, "both"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_gradients(fused, dtype, which):
    impl, device = fused
    _check_gradients(impl, device, dtype, "channels_last", 1e-2, which=which)


def test_triton_multi_pass_gradients(triton_device, monkeypatch):
    monkeypatch.setattr(triton_kernels, "ON_CHIP_ELEMENTS", 16)
    monkeypatch.setattr(triton_kernels, "CHUNK_ELEMENTS", 8)
    _check_gradients("triton", triton_device, torch.float32, "contiguous", 1e-5)


@pytest.mark.parametrize("impl", ["cpu", "reference"])
@pytest.mark.parametrize("which", [None] + SCALE_SHIFT)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("act", [True, False])
def test_gradcheck(impl, which, layout, act):
    shape, device = (2, 6, 3, 4), torch.device("cpu")
    x, weight, bias, add = _inputs(shape, 3, torch.float64, device, layout)
    scale, shift = _scale_shift_inputs(shape, torch.float64, device, which, seed=1)
    leaves = [t.requires_grad_() for t in (x, weight, bias, add, scale, shift) if t is not None]

    def f(x, w, b, a, *per_sample):
        given = iter(per_sample)
        return group_norm_silu(x, w, b, 3, add=a, act=act, impl=impl, scale=next(given) if scale is not None else None,
                               shift=next(given) if shift is not None else None)
    assert torch.autograd.gradcheck(f, leaves)


def _op_and_args(impl, device, dtype=torch.float32, layout="contiguous", which=None):
    x, weight, bias, add = _inputs((2, 8, 3, 5), 4, dtype, device, layout)
    scale, shift = _scale_shift_inputs(x.shape, dtype, device, which, seed=2)
    op = torch.ops.ddpm_fast.group_norm_silu_triton if impl == "triton" else torch.ops.ddpm_fast.group_norm_silu
    return op, (x, weight, bias, add, scale, shift, 4, 1e-6, True)


@pytest.mark.parametrize("which", [None, "both", "shift"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(fused, layout, which):
    impl, device = fused
    op, args = _op_and_args(impl, device, torch.bfloat16, layout, which)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    if not _interpreted(impl, device):
        tests += ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(op.default, args, test_utils=tests)
    grad_args = tuple(t.float().requires_grad_() if isinstance(t, torch.Tensor) else t for t in args)
    torch.library.opcheck(op.default, grad_args, test_utils=tests)
    _, mean, rstd = op(*grad_args)
    backward = (torch.ops.ddpm_fast.group_norm_silu_backward_triton if impl == "triton"
                else torch.ops.ddpm_fast.group_norm_silu_backward)
    inputs = [t.detach() if isinstance(t, torch.Tensor) else t for t in grad_args[:6]]
    torch.library.opcheck(backward.default, (torch.randn_like(inputs[0]), *inputs, mean.detach(), rstd.detach(), 4,
                                             True), test_utils=tests)


@pytest.mark.parametrize("which", [None, "both"])
def test_compiles_without_graph_breaks(fused, which):
    impl, device = fused
    _, (x, weight, bias, add, scale, shift, groups, eps, act) = _op_and_args(impl, device, which=which)

    def f(x, weight, bias, add, *scale_shift):
        scale, shift = scale_shift or (None, None)
        h = group_norm_silu(x * 1.0, weight, bias, groups, eps, add=add, impl=impl, scale=scale, shift=shift)
        return group_norm_silu(h, weight, bias, groups, eps, act=False, impl=impl, scale=scale) + 0.0

    # inductor on GPUs; aot_eager on the CPU keeps the test quick and still traces through the fake
    # kernels, forward and backward
    backend = "inductor" if device.type == "cuda" else "aot_eager"
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    inputs = [t for t in (x, weight, bias, add, scale, shift) if t is not None]
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = compiled(*leaves)
    assert torch.allclose(out, f(*inputs), rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(out.square().sum(), leaves)
    eager_leaves = [t.detach().requires_grad_() for t in inputs]
    eager_grads = torch.autograd.grad(f(*eager_leaves).square().sum(), eager_leaves)
    for got, want in zip(grads, eager_grads):
        assert relative_error(got, want) < 1e-5


SMALL_UNET = dict(ch=16, out_ch=2, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0,
                  in_channels=2, resolution=8, num_groups=8)


@pytest.mark.parametrize("backend", ["auto", "cpu", "triton", "cuda"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=str)
def test_unet_on_the_fused_op_equals_the_reference_unet(backend, memory_format, triton_device):
    device = cuda_or_skip() if backend == "cuda" else triton_device if backend == "triton" else torch.device("cpu")
    torch.manual_seed(0)
    model = UNet(**SMALL_UNET, backend="reference").to(device)
    for norm in (m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)):
        torch.nn.init.normal_(norm.weight, 1.0, 0.3)  # not the identity affine of a fresh model
        torch.nn.init.normal_(norm.bias, 0.0, 0.3)
    x = torch.randn(3, 2, 8, 8, device=device).to(memory_format=memory_format)
    t = torch.tensor([0, 500, 999], device=device)
    with torch.no_grad():
        expected = model(x, t)
        model.backend = backend
        got = model(x, t)
    assert relative_error(got, expected) < 1e-5


def test_the_unet_trains_through_the_fused_op():
    torch.manual_seed(1)
    model = UNet(**SMALL_UNET, backend="cpu")
    reference = UNet(**SMALL_UNET, backend="reference")
    reference.load_state_dict(model.state_dict())
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([3, 700])
    model(x, t).square().mean().backward()
    reference(x, t).square().mean().backward()
    grads = dict((name, p.grad) for name, p in model.named_parameters())
    ref_grads = dict((name, p.grad) for name, p in reference.named_parameters())
    assert relative_error(torch.cat([g.flatten() for g in grads.values()]),
                          torch.cat([g.flatten() for g in ref_grads.values()])) < 1e-5
    # every norm's own parameters (an attention key's bias, whose gradient is 0 up to rounding, is not)
    norms = [name for name in grads if "norm" in name]
    assert norms and all(relative_error(grads[name], ref_grads[name]) < 1e-4 for name in norms)


@pytest.mark.parametrize("impl", ["cpu", "triton", "reference"])
def test_bad_inputs(impl):
    x, weight, bias, add = _inputs((2, 8, 3, 3), 4, torch.float32, torch.device("cpu"))

    def call(**kw):
        args = dict(x=x, weight=weight, bias=bias, num_groups=4, add=add, impl=impl)
        return group_norm_silu(**{**args, **kw})

    with pytest.raises(ValueError, match=r"C = 8 must be divisible by num_groups, got num_groups = 3"):
        call(num_groups=3)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\) for x of shape \(2, 8, 3, 3\), got \(6,\)"):
        call(weight=weight[:6])
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\).*got \(8, 1\)"):
        call(bias=bias[:, None])
    with pytest.raises(ValueError, match=r"add must have shape \(2, 8\).*got \(2, 8, 1, 1\)"):
        call(add=add[:, :, None, None])
    with pytest.raises(ValueError, match=r"x must be 4-D \[N, C, H, W\], got 3-D \(8, 3, 3\)"):
        call(x=x[0])
    with pytest.raises(TypeError, match="weight must have x's dtype torch.float16, got torch.float32"):
        call(x=x.half(), bias=bias.half(), add=add.half())
    with pytest.raises(TypeError, match="add must have x's dtype torch.float32, got torch.bfloat16"):
        call(add=add.bfloat16())
    with pytest.raises(TypeError, match="x must be float32, float16, bfloat16 or float64, got torch.int64"):
        call(x=x.long())
    with pytest.raises(ValueError, match="add is on meta but x is on cpu"):
        call(add=add.to("meta"))
    with pytest.raises(ValueError, match="must not be empty"):
        call(x=x[:0], add=add[:0])
    with pytest.raises(ValueError, match="eps must be a finite number"):
        call(eps=float("nan"))


def test_raw_cpu_op_checks_its_arguments():
    x, weight, bias, add = _inputs((2, 8, 3, 3), 4, torch.float32, torch.device("cpu"))
    with pytest.raises(RuntimeError, match=r"C = 8 must be divisible by num_groups = 3"):
        torch.ops.ddpm_fast.group_norm_silu(x, weight, bias, add, None, None, 3, 1e-6, True)
    with pytest.raises(RuntimeError, match=r"add must have shape \[2, 8\], got \[8\]"):
        torch.ops.ddpm_fast.group_norm_silu(x, weight, bias, add[0], None, None, 4, 1e-6, True)
    with pytest.raises(RuntimeError, match="weight must have x's dtype Double, got Float"):
        torch.ops.ddpm_fast.group_norm_silu(x.double(), weight, bias.double(), None, None, None, 4, 1e-6, True)


# -- the scale-shift form (guided-diffusion's ResBlock with use_scale_shift_norm) ------------------------
# guided-diffusion's ImageNet-64 U-Net (model_channels 192, channel_mult 1, 2, 3, 4, 32 groups): groups of 6,
# 12, 18 and 24 channels, not powers of 2
ADM_SHAPES = [(2, 192, 64, 64), (1, 384, 32, 32), (3, 576, 16, 16), (2, 768, 8, 8), (1, 1152, 8, 8)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", ADM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpu_op_scale_shift_at_guided_diffusions_shapes(shape, layout, dtype):
    _check_forward("cpu", torch.device("cpu"), shape, 32, dtype, layout, False, True, "both", eps=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", ADM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_scale_shift_at_guided_diffusions_shapes(shape, dtype, impl):
    _check_forward(impl, cuda_or_skip(), shape, 32, dtype, "channels_last", False, True, "both", eps=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_shift_covers_guided_diffusions_group_norm32(fused, dtype):
    # guided-diffusion's ResBlock: GroupNorm32 (statistics in float32, eps 1e-5, cast back to x's
    # dtype), then · (1 + scale) + shift and SiLU in x's dtype. The fused op takes the whole affine
    # and the SiLU in float32 and rounds once: within §6's bound of the float64 maths, and no
    # further from them than guided-diffusion's own sequence of roundings.
    impl, device = fused
    shape, groups = (2, 64, 8, 8), 32
    x, weight, bias, _ = _inputs(shape, groups, dtype, device, "channels_last", False, seed=7)
    scale, shift = _scale_shift_inputs(shape, dtype, device, "both", seed=8)
    out = group_norm_silu(x, weight, bias, groups, 1e-5, impl=impl, scale=scale, shift=shift)
    _assert_matches_reference(out, x, weight, bias, groups, None, True, scale, shift, eps=1e-5)
    theirs = F.group_norm(x.float(), groups, weight.float(), bias.float(), 1e-5).to(dtype)
    theirs = F.silu(_scale_shift(theirs, scale, shift))
    expected = _reference(x, weight, bias, groups, None, True, 1e-5, scale, shift)
    assert relative_error(out, expected) <= relative_error(theirs, expected)


@pytest.mark.parametrize("shape,groups", [((1, 256, 4, 4), 32), ((3, 96, 3, 5), 32), ((1, 192, 9, 9), 8)],
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else f"g{v}")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cpu_op_scale_shift_gradients_over_block_partitions(shape, groups, layout):
    # the CPU kernel's blocks of several groups (NCHW) and of 64-channel runs (NHWC): the scale-shift
    # coefficients are taken per block, of its sample and channels
    _check_gradients("cpu", torch.device("cpu"), torch.float32, layout, 1e-5, shape, groups, which="both")


@pytest.mark.parametrize("on_chip,chunk", [(16, 2), (16, 8)])
def test_triton_scale_shift_over_chunks(triton_device, monkeypatch, on_chip, chunk):
    # the forward's three sweeps and the backward's two, over channel chunks (chunk 2 of 4-channel
    # groups) and position chunks: each chunk's coefficients are its own channels'
    monkeypatch.setattr(triton_kernels, "ON_CHIP_ELEMENTS", on_chip)
    monkeypatch.setattr(triton_kernels, "CHUNK_ELEMENTS", chunk)
    _check_forward("triton", triton_device, (2, 8, 5, 3), 2, torch.float32, "channels_last", True, True,
                               "both")
    _check_gradients("triton", triton_device, torch.float32, "contiguous", 1e-5, groups=2, which="both")


@pytest.mark.parametrize("impl", ["cpu", "triton", "reference"])
@pytest.mark.parametrize("name", ["scale", "shift"])
def test_bad_scale_shift(impl, name):
    x, weight, bias, add = _inputs((2, 8, 3, 3), 4, torch.float32, torch.device("cpu"))
    good = torch.randn(2, 8)

    def call(t):
        return group_norm_silu(x, weight, bias, 4, add=add, impl=impl, **{name: t})

    with pytest.raises(ValueError, match=rf"{name} must have shape \(2, 8\) for x of shape \(2, 8, 3, 3\), got \(8,\)"):
        call(good[0])
    with pytest.raises(ValueError, match=rf"{name} must have shape \(2, 8\).*got \(2, 8, 1, 1\)"):
        call(good[:, :, None, None])
    with pytest.raises(TypeError, match=f"{name} must have x's dtype torch.float32, got torch.float16"):
        call(good.half())
    with pytest.raises(ValueError, match=f"{name} is on meta but x is on cpu"):
        call(good.to("meta"))


@pytest.mark.parametrize("position,name", [(4, "scale"), (5, "shift")])
def test_raw_ops_check_scale_and_shift(position, name):
    x, weight, bias, add = _inputs((2, 8, 3, 3), 4, torch.float32, torch.device("cpu"))
    args = [x, weight, bias, add, None, None, 4, 1e-6, True]
    args[position] = torch.randn(8)
    with pytest.raises(RuntimeError, match=rf"{name} must have shape \[2, 8\], got \[8\]"):
        torch.ops.ddpm_fast.group_norm_silu(*args)
    args[position] = torch.randn(2, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=f"{name} must have x's dtype Float, got Double"):
        torch.ops.ddpm_fast.group_norm_silu(*args)
    _, mean, rstd = torch.ops.ddpm_fast.group_norm_silu(x, weight, bias, add, None, None, 4, 1e-6, True)
    args[position] = torch.randn(2, 9)
    with pytest.raises(RuntimeError, match=rf"{name} must have shape \[2, 8\], got \[2, 9\]"):
        torch.ops.ddpm_fast.group_norm_silu_backward(torch.randn_like(x), *args[:6], mean, rstd, 4, True)
