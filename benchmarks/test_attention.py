"""ops.attention against torch's scaled_dot_product_attention (whatever backend it picks) and
the eager bmm-softmax-bmm, at the DDPM attention shapes: N = 256 tokens (16×16) with d = 256
(CIFAR-10) and d = 512 (LSUN/CelebA-HQ 256), and N = 16 (the 4×4 mid block). Batch 256 on GPUs,
8 on the CPU. Work: 4·B·N²·d flops (two matmuls), reported as TFLOP/s.

    pytest benchmarks/test_attention.py --benchmark-only
"""
import pytest
import torch
import torch.nn.functional as F

from ddpm_fast.ops import attention
from ddpm_fast.reference import ops as reference

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
BATCH = 256 if ON_GPU else 8
SHAPES = [(256, 256), (256, 512), (16, 256)]  # (N, d)
DTYPES = [torch.bfloat16, torch.float32] if ON_GPU else [torch.float32]
IMPLS = {
    "eager": lambda q, k, v: reference.attention(q, k, v),
    "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
    "ours": lambda q, k, v: attention(q, k, v, impl="triton" if ON_GPU else "auto"),
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", SHAPES, ids=lambda v: str(v))
def test_attention(measure, benchmark, n, d, dtype, impl):
    q, k, v = (torch.randn(BATCH, 1, n, d, device=DEVICE, dtype=dtype) for _ in range(3))
    flops = 4 * BATCH * n * n * d
    fn = IMPLS[impl]
    median = measure(f"attention N={n} d={d} {str(dtype)[6:]}", impl, lambda: fn(q, k, v), DEVICE,
                     bytes_moved=4 * q.numel() * q.element_size())
    benchmark.extra_info["tflop_per_s"] = flops / median / 1e12
