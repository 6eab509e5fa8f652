"""ops.conv2d (DESIGN §5.8): every plan equals the float64 reference at many shapes and layouts,
with and without the residual add; packed weights follow every change of the weights; a missing
private op falls back with one warning; autograd takes the differentiable path; the whole U-Net
packed equals it unpacked."""
import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F

from ddpm_fast import UNet, ops
from ddpm_fast.ops import _conv2d_plan
from ddpm_fast.ops.conv2d import PackedConv2d
from ddpm_fast.reference.conv2d import conv2d as reference_conv2d
from helpers import relative_error

conv2d_module = importlib.import_module("ddpm_fast.ops.conv2d")  # ops.conv2d itself is the function

# (batch, C_in, C_out, H, W, kernel, stride, padding, pre-pad): odd sizes, stride 2 with the DDPM
# Downsample's (0, 1, 0, 1) pre-pad and with ADM's padding 1, 1×1, batch 1, 3 input channels.
SHAPES = [
    (2, 8, 16, 8, 8, 3, 1, 1, None),
    (1, 3, 32, 17, 13, 3, 1, 1, None),
    (3, 16, 16, 8, 10, 3, 2, 0, (0, 1, 0, 1)),
    (2, 16, 24, 9, 7, 3, 2, 1, None),
    (3, 48, 24, 7, 5, 1, 1, 0, None),
    (1, 64, 64, 4, 4, 3, 1, 1, None),
    (5, 12, 8, 11, 6, 3, 1, 1, None),
]


def _random_conv(c_in, c_out, kernel, stride, padding, seed=0):
    torch.manual_seed(seed)
    conv = PackedConv2d(c_in, c_out, kernel, stride, padding)
    torch.nn.init.normal_(conv.weight, 0.0, 0.3), torch.nn.init.normal_(conv.bias, 0.0, 0.3)
    return conv.requires_grad_(False)


def _in_layout(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # a view that is neither NCHW- nor channels_last-contiguous
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    return t.contiguous()


def _expected(conv, x, add):
    return reference_conv2d(x.double(), conv.weight.double(), conv.bias.double(), conv.stride, conv.padding,
                            None if add is None else add.double())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:8])) + ("-prepad" if s[8] else ""))
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "add"])
@pytest.mark.parametrize("impl", ["torch", "packed", "auto"])
def test_every_plan_equals_the_float64_reference(shape, layout, residual, impl):
    batch, c_in, c_out, h, w, kernel, stride, padding, prepad = shape
    conv = _random_conv(c_in, c_out, kernel, stride, padding)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, c_in, h, w, generator=g)
    if prepad:
        x = F.pad(x, prepad)
    x = _in_layout(x, layout)
    add = None
    if residual:
        out_shape = F.conv2d(x, conv.weight, None, stride, padding).shape
        add = _in_layout(torch.randn(out_shape, generator=g), layout)
    if layout == "strided":
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for _ in range(2):  # the first call packs (and for "auto" measures), the second reuses
            got = ops.conv2d(conv, x, add, impl)
            assert got.shape == _expected(conv, x, add).shape and got.dtype == torch.float32
            assert relative_error(got, _expected(conv, x, add)) < 1e-5
    if impl == "packed":
        assert got.is_contiguous(memory_format=torch.channels_last)  # the packed op writes channels_last
        assert x.shape in conv2d_module._packs[conv][1]


@pytest.mark.parametrize("fused_add", [False, True])
def test_the_residual_add_inside_or_after_the_packed_conv(monkeypatch, fused_add):
    # torch < 2.14 adds after the convolution (FUSED_ADD); both ways must give the reference
    monkeypatch.setattr(conv2d_module, "FUSED_ADD", fused_add)
    conv = _random_conv(16, 24, 3, 1, 1)
    for layout in ("nchw", "channels_last", "strided"):
        x = _in_layout(torch.randn(2, 16, 7, 9), layout)
        add = _in_layout(torch.randn(2, 24, 7, 9), layout)
        with torch.no_grad():
            got = ops.conv2d(conv, x, add, impl="packed")
        assert relative_error(got, _expected(conv, x, add)) < 1e-5


def _check_follows(conv, x, previous):
    """The packed output equals the reference for the weights as they are now, and differs from
    what the previous weights gave (so a stale pack would fail)."""
    with torch.no_grad():
        got = ops.conv2d(conv, x, impl="packed")
    assert relative_error(got, _expected(conv, x, None)) < 1e-5
    assert relative_error(got, previous) > 1e-3
    return got


def test_packed_weights_follow_every_change_of_the_weights():
    conv = _random_conv(16, 16, 3, 1, 1).requires_grad_(True)
    x = torch.randn(2, 16, 9, 9).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = ops.conv2d(conv, x, impl="packed")
    assert relative_error(out, _expected(conv, x, None)) < 1e-5
    # an optimiser step (the training path is F.conv2d's, differentiable)
    optimiser = torch.optim.SGD(conv.parameters(), lr=0.5)
    ops.conv2d(conv, x, impl="packed").square().mean().backward()
    optimiser.step()
    out = _check_follows(conv, x, out)
    # load_state_dict
    other = _random_conv(16, 16, 3, 1, 1, seed=7)
    conv.load_state_dict(other.state_dict())
    out = _check_follows(conv, x, out)
    # .to(dtype) and back: new storage holding the bfloat16-rounded weights
    conv.to(torch.bfloat16).to(torch.float32)
    out = _check_follows(conv, x, out)
    # an in-place edit under no_grad: same storage, a new version
    with torch.no_grad():
        conv.weight.mul_(-0.5)
    _check_follows(conv, x, out)


def test_each_new_shape_packs_on_first_use_and_is_reused():
    conv = _random_conv(8, 8, 3, 1, 1)
    shapes = [(2, 8, 6, 6), (1, 8, 5, 7)]
    with torch.no_grad():
        for shape in shapes:
            x = torch.randn(shape)
            assert relative_error(ops.conv2d(conv, x, impl="packed"), _expected(conv, x, None)) < 1e-5
        packs = conv2d_module._packs[conv][1]
        assert set(packs) == {torch.Size(s) for s in shapes}
        first = packs[torch.Size(shapes[0])]
        ops.conv2d(conv, torch.randn(shapes[0]), impl="packed")
        assert conv2d_module._packs[conv][1][torch.Size(shapes[0])] is first  # reused, not packed again


def test_a_missing_private_op_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(conv2d_module, "REQUIRED_OPS", conv2d_module.REQUIRED_OPS + ("_no_such_op",))
    conv2d_module.packing_available.cache_clear()
    try:
        conv = _random_conv(8, 8, 3, 1, 1)
        x = torch.randn(2, 8, 6, 6)
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            for impl in ("packed", "auto", "packed"):
                out = ops.conv2d(conv, x, impl=impl)
                assert out.is_contiguous() and relative_error(out, _expected(conv, x, None)) < 1e-5
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 1 and "_no_such_op" in messages[0] and "F.conv2d" in messages[0]
        assert conv not in conv2d_module._packs  # nothing was packed
    finally:
        monkeypatch.undo()
        conv2d_module.packing_available.cache_clear()


@pytest.mark.parametrize("impl", ["packed", "auto"])
def test_with_grad_enabled_the_path_is_differentiable(impl):
    conv = _random_conv(8, 12, 3, 1, 1).requires_grad_(True)
    x = torch.randn(2, 8, 7, 7, requires_grad=True)
    add = torch.randn(2, 12, 7, 7, requires_grad=True)
    out = ops.conv2d(conv, x, add, impl)
    assert out.grad_fn is not None
    cotangent = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, add, conv.weight, conv.bias), cotangent)
    x64, add64 = x.detach().double().requires_grad_(), add.detach().double().requires_grad_()
    w64, b64 = conv.weight.detach().double().requires_grad_(), conv.bias.detach().double().requires_grad_()
    ref = reference_conv2d(x64, w64, b64, 1, 1, add64)
    expected = torch.autograd.grad(ref, (x64, add64, w64, b64), cotangent.double())
    for got, want in zip(grads, expected):
        assert relative_error(got, want) < 1e-5
    # weights frozen, input requiring grad (classifier guidance's ∇ₓ): differentiable as well
    conv.requires_grad_(False)
    (grad_x,) = torch.autograd.grad(ops.conv2d(conv, x, None, impl).sum(), x)
    (want_x,) = torch.autograd.grad(reference_conv2d(x64, w64.detach(), b64.detach(), 1, 1).sum(), x64)
    assert relative_error(grad_x, want_x) < 1e-5


def test_the_plan_is_measured_once_and_the_faster_kept(monkeypatch):
    monkeypatch.setattr(_conv2d_plan, "_choices", {})
    calls, clock = [], [0.0]
    # a clock that only the runs advance: "packed" takes 2 units, "torch" 1 (no timing noise)
    monkeypatch.setattr(_conv2d_plan.time, "perf_counter", lambda: clock[0])

    def run(plan, conv, x, add):
        calls.append(plan)
        clock[0] += 2.0 if plan == "packed" else 1.0
        return conv(x) if add is None else conv(x) + add

    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 5, 5)
    assert _conv2d_plan.choose(conv, x, None, run) == "torch"
    assert calls.count("torch") == calls.count("packed") == 1 + _conv2d_plan.REPEATS
    assert _conv2d_plan.choose(conv, x, None, run) == "torch" and len(calls) == 2 * (1 + _conv2d_plan.REPEATS)
    # another layout with a residual is another key: measured anew
    _conv2d_plan.choose(conv, x.contiguous(memory_format=torch.channels_last), torch.randn(1, 4, 5, 5), run)
    assert len(_conv2d_plan.choices()) == 2


def test_bad_input_names_what_was_expected():
    conv = _random_conv(8, 8, 3, 1, 1)
    with pytest.raises(ValueError, match=r"x must be \[B, 8, H, W\], got \(2, 4, 6, 6\)"):
        ops.conv2d(conv, torch.randn(2, 4, 6, 6))
    with pytest.raises(ValueError, match=r"add must have the output's shape \(2, 8, 6, 6\), got \(2, 8, 5, 6\)"):
        ops.conv2d(conv, torch.randn(2, 8, 6, 6), torch.randn(2, 8, 5, 6))
    with pytest.raises(ValueError, match="impl"):
        ops.conv2d(conv, torch.randn(2, 8, 6, 6), impl="cuda")
    with pytest.raises(TypeError, match="nn.Conv2d"):
        ops.conv2d(torch.nn.Linear(3, 3), torch.randn(2, 8, 6, 6))


def _set_conv_impl(model, impl):
    for module in model.modules():
        if isinstance(module, PackedConv2d):
            module.impl = impl


@pytest.mark.parametrize("preset", ["digits", "small"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=str)
@pytest.mark.parametrize("impl", ["packed", "auto"])
def test_whole_unet_packed_equals_the_float64_reference(preset, memory_format, impl):
    torch.manual_seed(0)
    model = getattr(UNet, preset)().eval()
    for m in model.modules():  # non-trivial residual branches (the presets zero-init their last convs)
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, 0.0, 0.15)
    _set_conv_impl(model, impl)
    x = torch.randn(3, 1, 16, 16).contiguous(memory_format=memory_format)
    t = torch.tensor([3, 400, 999])
    with torch.inference_mode():
        got = model(x, t)
        model.backend = "torch"  # F.conv2d everywhere: today's path
        unpacked = model(x, t)
        model.backend = "reference"
        expected = model.double()(x.double(), t)
    assert got.is_contiguous(memory_format=memory_format)
    assert relative_error(got, expected) < 1e-5 and relative_error(unpacked, expected) < 1e-5


def test_new_storage_at_a_freed_address_is_not_taken_for_the_packed_weights():
    # assigning .data (as module.to() does) keeps the version counter, and the allocator hands the
    # freed block of the packed weights straight back to new weights of the same size (seen in CI
    # with .to(bfloat16).to(float32)) unless the pack holds the storage it packed
    conv = _random_conv(16, 16, 3, 1, 1)
    x = torch.randn(2, 16, 9, 9)
    for _ in range(4):
        with torch.no_grad():
            ops.conv2d(conv, x, impl="packed")
            packed_at = conv.weight.data_ptr()
            conv.weight.data = conv.weight.data.double()  # the packed float32 block is free now
            conv.weight.data = (conv.weight.data * 0.5).float()
            reused = conv.weight.data_ptr() == packed_at
            assert relative_error(ops.conv2d(conv, x, impl="packed"), _expected(conv, x, None)) < 1e-5, reused
