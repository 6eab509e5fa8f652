"""ops.attention (the Triton flash kernel, SDPA on CPU, the reference) against float64
softmax attention, the U-Net attention block on it, the diffusers processor, bad input."""
import itertools

import pytest
import torch

import ddpm_fast as df
from ddpm_fast.integrations.diffusers import AttnProcessor, use_fast_attention
from ddpm_fast.ops import attention
from helpers import relative_error

ON_GPU = torch.cuda.is_available()
NS, DS = (1, 16, 100, 256, 1000), (32, 64, 128, 256, 512)
# Every combination on a GPU; in the interpreter (~4000× slower) each N and each d at least once.
SHAPES = list(itertools.product((1, 3), (1, 4), NS, DS)) if ON_GPU else [
    (1, 1, 1, 32), (3, 4, 16, 64), (1, 1, 100, 128), (3, 1, 256, 256), (1, 1, 1000, 512), (1, 4, 16, 512),
    (3, 1, 100, 32), (1, 1, 7, 40)]
LOW = [torch.float16, torch.bfloat16]


def _reference64(q, k, v, scale):
    q, k, v = q.double(), k.double(), v.double()
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v


def _qkv(shape, dtype, device, seed=0, strided=False):
    g = torch.Generator().manual_seed(seed)
    B, H, N, D = shape
    if strided:  # the layout the U-Net block feeds: one [B, N, 3·H·D] GEMM output, viewed
        qkv = torch.randn(B, N, 3, H, D, generator=g).to(dtype=dtype, device=device)
        return tuple(qkv.permute(2, 0, 3, 1, 4))
    return tuple(torch.randn(shape, generator=g).to(dtype=dtype, device=device) for _ in range(3))


def _low_precision_bound(q, k, v, scale, dtype):
    # DESIGN §6: 1e-2, or at most 2× the error of the reference itself run in the low precision
    ref64 = _reference64(q, k, v, scale)
    ref_low = torch.softmax((q @ k.transpose(-1, -2)).float() * scale, dim=-1).to(dtype) @ v
    return max(1e-2, 2 * relative_error(ref_low, ref64)), ref64


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("precision", ["tf32x3", "ieee"] if ON_GPU else ["ieee"])  # alike in the interpreter
def test_triton_fp32_matches_float64(triton_device, shape, precision):
    q, k, v = _qkv(shape, torch.float32, triton_device, strided=shape[2] % 2 == 0)
    scale = shape[3] ** -0.5
    out = attention(q, k, v, impl="triton", precision=precision)
    assert out.shape == shape and out.dtype == torch.float32
    assert relative_error(out, _reference64(q, k, v, scale)) < 1e-5


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("shape", [(3, 4, 16, 64), (1, 1, 256, 256), (1, 1, 100, 512)], ids=str)
def test_triton_low_precision(triton_device, shape, dtype):
    if triton_device.type == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter multiplies bfloat16 bit patterns in tl.dot (triton-lang/triton#11584, "
                    "unsupported upstream); float16 runs the same kernel code here, bfloat16 runs on GPUs")
    q, k, v = _qkv(shape, dtype, triton_device, seed=1, strided=True)
    scale = shape[3] ** -0.5
    bound, ref64 = _low_precision_bound(q, k, v, scale, dtype)
    out = attention(q, k, v, impl="triton")
    assert out.dtype == dtype and relative_error(out, ref64) < bound


def test_tf32_option_on_gpu(device):
    if device.type != "cuda":
        pytest.skip("TF32 dots exist on GPUs only (the interpreter computes float32 products)")
    q, k, v = _qkv((2, 1, 256, 256), torch.float32, device)
    out = attention(q, k, v, impl="triton", precision="tf32")
    assert relative_error(out, _reference64(q, k, v, 256 ** -0.5)) < 2e-3  # TF32 keeps 10 mantissa bits


@pytest.mark.parametrize("impl", ["triton", "auto", "reference"])
def test_large_logits_stay_finite(triton_device, impl):
    # scale·|q·k| ≈ 1e4: without the running maximum exp() would overflow
    device = triton_device if impl == "triton" else torch.device("cpu")
    q, k, v = _qkv((1, 2, 64, 64), torch.float32, device, seed=2)
    q = q * 100.0
    k = k * 12.5
    out = attention(q, k, v, impl=impl)
    ref = _reference64(q, k, v, 64 ** -0.5)
    # logits of 1e4 carry float32 rounding of ~1e-3 in the exponent whatever the kernel, so the
    # bound is DESIGN §6's: 1e-5, or 2× the error of the materialised float32 reference
    ref32_error = relative_error(attention(q.cpu(), k.cpu(), v.cpu(), impl="reference"), ref)
    assert torch.isfinite(out).all() and relative_error(out, ref) < max(1e-5, 2 * ref32_error)


@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_cpu_paths(impl):
    for shape in [(1, 1, 1, 32), (3, 4, 100, 64), (1, 1, 256, 512)]:
        q, k, v = _qkv(shape, torch.float32, "cpu", strided=True)
        assert relative_error(attention(q, k, v, impl=impl), _reference64(q, k, v, shape[3] ** -0.5)) < 1e-5


def test_cross_attention_lengths(triton_device):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 2, 10, 32, generator=g).to(triton_device)
    k, v = (torch.randn(2, 2, 37, 32, generator=g).to(triton_device) for _ in range(2))
    assert relative_error(attention(q, k, v, scale=0.3, impl="triton"), _reference64(q, k, v, 0.3)) < 1e-5


def test_opcheck_and_compile(triton_device):
    q, k, v = _qkv((2, 1, 16, 32), torch.float32, triton_device, strided=True)
    torch.library.opcheck(torch.ops.ddpm_fast.attention_triton.default, (q, k, v, 0.25, "ieee"),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    backend = "inductor" if triton_device.type == "cuda" else "aot_eager"
    f = lambda q, k, v: attention(q * 1.0, k, v, impl="triton") + 1.0  # noqa: E731
    assert relative_error(torch.compile(f, fullgraph=True, backend=backend)(q, k, v), f(q, k, v)) < 1e-6


def _small_unet(seed=0):
    torch.manual_seed(seed)
    model = df.UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=16, dropout=0.0).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_unet_attention_block_matches_the_reference(triton_device, backend):
    model = _small_unet().to(triton_device if backend == "triton" else "cpu")
    block = model.mid.attn_1
    x = torch.randn(2, 64, 8, 8, device=next(model.parameters()).device)
    with torch.no_grad():
        block.backend = "reference"
        expected = block(x)
        block.backend = backend
        got = block(x)
        assert relative_error(got, expected) < 1e-5
        assert relative_error(block(x.to(memory_format=torch.channels_last)), expected) < 1e-5


def test_unet_with_fused_attention_matches_the_reference():
    model = _small_unet(1)
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([0, 500, 999])
    with torch.no_grad():
        model.backend = "reference"
        expected = model(x, t)
        model.backend = "auto"
        assert relative_error(model(x, t), expected) < 1e-5


@pytest.mark.parametrize("impl", ["auto", "triton", "reference"])
def test_diffusers_processor(impl):
    diffusers = pytest.importorskip("diffusers")
    from test_diffusers_parity import SMALL_CONFIG, _random_unet2d
    model = _random_unet2d(SMALL_CONFIG, seed=4)
    device = "cuda" if ON_GPU and impl == "triton" else "cpu"
    model = model.to(device)
    x, t = torch.randn(2, 1, 16, 16, device=device), torch.tensor([3, 700], device=device)
    with torch.no_grad():
        expected = model(x, t).sample
        assert use_fast_attention(model, impl=impl) == 4
        assert all(isinstance(m.processor, AttnProcessor) for m in model.modules()
                   if isinstance(m, diffusers.models.attention_processor.Attention))
        assert relative_error(model(x, t).sample, expected) < 1e-5


@pytest.mark.parametrize("make,error,match", [
    (lambda: (torch.zeros(2, 4, 8), torch.zeros(2, 4, 8), torch.zeros(2, 4, 8)), ValueError, r"\[B, heads, N, d\]"),
    (lambda: (torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 5, 8), torch.zeros(1, 1, 6, 8)), ValueError, "k = v"),
    (lambda: (torch.zeros(1, 1, 4, 8), torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8)), ValueError, "k = v"),
    (lambda: (torch.zeros(1, 1, 4, 520),) * 3, ValueError, "<= 512"),
    (lambda: (torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8).half(), torch.zeros(1, 1, 4, 8)), TypeError, "one dtype"),
    (lambda: (torch.zeros(1, 1, 4, 8, dtype=torch.float64),) * 3, TypeError, "float32/float16/bfloat16"),
    (lambda: (torch.zeros(0, 1, 4, 8),) * 3, ValueError, ">= 1"),
    (lambda: (torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8, device="meta"), torch.zeros(1, 1, 4, 8)), ValueError,
     "one device"),
])
def test_bad_input(make, error, match):
    with pytest.raises(error, match=match):
        attention(*make())
    with pytest.raises(ValueError, match="precision"):
        attention(*(torch.zeros(1, 1, 4, 8),) * 3, precision="bf16x3")


def _tf32(x):
    # round float32 to TF32 (10 mantissa bits), to nearest with ties away from zero (cvt.rna.tf32.f32)
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def _dot_tf32x3(a, b):
    # Triton's input_precision="tf32x3": a ≈ hi + lo with both TF32, three tensor-core products
    # (exact for TF32 operands) accumulated in float32; lo·lo is dropped
    a_hi, b_hi = _tf32(a), _tf32(b)
    a_lo, b_lo = _tf32(a - a_hi), _tf32(b - b_hi)
    return a_hi @ b_lo + a_lo @ b_hi + a_hi @ b_hi


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_tf32x3_arithmetic_matches_float64(shape):
    # The interpreter ignores input_precision, so the kernel's float32 default ("tf32x3",
    # DESIGN §5.3) is emulated here: both dots as three TF32 products, softmax in float32
    q, k, v = _qkv(shape, torch.float32, torch.device("cpu"), strided=shape[2] % 2 == 0)
    scale = shape[3] ** -0.5
    s = _dot_tf32x3(q, k.transpose(-1, -2)) * (scale * 1.4426950408889634)
    p = torch.exp2(s - s.amax(-1, keepdim=True))
    out = _dot_tf32x3(p, v) / p.sum(-1, keepdim=True)
    assert relative_error(out, _reference64(q, k, v, scale)) < 1e-5
    # one TF32 product is not float32-class: the emulation does round
    single = torch.softmax(_tf32(q) @ _tf32(k).transpose(-1, -2) * scale, -1)
    assert relative_error(_tf32(single) @ _tf32(v), _reference64(q, k, v, scale)) > 1e-4
