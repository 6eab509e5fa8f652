"""ops.attention against the eager bmm-softmax-bmm reference, torch.compile of it and torch's
scaled_dot_product_attention (whatever backend it picks), at the DDPM attention shapes: N = 256
tokens (16×16) with d = 256 (CIFAR-10) and d = 512 (LSUN/CelebA-HQ 256), and N = 16 (the 4×4
mid block); one head. Work: 4·B·N²·d flops (two matmuls), reported as TFLOP/s.

On the CPU, ops.attention("auto") is scaled_dot_product_attention itself (there is no CPU
kernel of ours): its row shows what the U-Net runs there, not a kernel of this project.

    pytest benchmarks/test_attention.py --benchmark-only [--quick]
"""
import pytest
import torch
import torch.nn.functional as F

from benchmarks import settings
from benchmarks.rotation import rotate
from ddpm_fast.ops import attention
from ddpm_fast import reference

SIZES = settings.sizes()
DEVICE = settings.DEVICE
IMPLS = {
    "eager": lambda: reference.attention,
    "torch.compile": lambda: torch.compile(reference.attention),
    "sdpa": lambda: F.scaled_dot_product_attention,
    "fused triton" if settings.ON_GPU else "ours (sdpa on cpu)":
        lambda: lambda q, k, v: attention(q, k, v, impl="triton" if settings.ON_GPU else "auto"),
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", SIZES.attn_dtypes, ids=str)
@pytest.mark.parametrize("n,d", SIZES.attn_shapes, ids=lambda v: str(v))
def test_attention(measure, n, d, dtype, impl):
    batch = SIZES.attn_batch
    shape = (batch, 1, n, d)
    element = torch.finfo(dtype).bits // 8
    next_set, sets = rotate(lambda i: tuple(torch.randn(shape, device=DEVICE, dtype=dtype) for _ in range(3)),
                            3 * batch * n * d * element)
    fn = IMPLS[impl]()
    fn(*next_set())  # compiles (torch.compile, Triton) outside the timing
    measure(f"attention B={batch} N={n} d={d} {str(dtype)[6:]}", impl, lambda: fn(*next_set()),
            bytes_moved=4 * batch * n * d * element, flops=4 * batch * n * n * d, images=batch, input_sets=sets,
            kind="op", dtype=str(dtype)[6:])
