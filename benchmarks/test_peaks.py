"""The machine's measured ceilings, which the report divides every throughput by (METHOD:
datasheet rates are leads, measure them): a large device-to-device copy, counting bytes read
plus bytes written, and a large square matmul in bfloat16 and float32 on random data (zeros
run faster than real data on some GPUs). The float32 matmul runs under torch's defaults (no
TF32 for matmuls), which is the float32 the benchmarks' float32 rows run in. On a CPU also the
single core's float32 FMA peak, a GEMM on one thread: what each convolution's share of the peak
is of (DESIGN §5.8; benchmarks/cpu_convs.py).

    pytest benchmarks/test_peaks.py --benchmark-only [--quick]
"""
import pytest
import torch

from benchmarks import conv_shapes, settings

SIZES = settings.sizes()
DEVICE = settings.DEVICE


def test_copy(measure):
    src = torch.randn(SIZES.copy_numel, device=DEVICE)
    dst = torch.empty_like(src)
    measure("peak copy", "copy", lambda: dst.copy_(src), bytes_moved=2 * src.numel() * 4, kind="peak", dtype="float32")


@pytest.mark.parametrize("dtype", list(SIZES.matmul_n), ids=str)
def test_matmul(measure, dtype):
    n = SIZES.matmul_n[dtype]
    a, b = (torch.randn(n, n, device=DEVICE, dtype=dtype) for _ in range(2))
    out = torch.empty(n, n, device=DEVICE, dtype=dtype)
    measure(f"peak matmul {str(dtype)[6:]}", "matmul", lambda: torch.mm(a, b, out=out), flops=2 * n ** 3, kind="peak",
            dtype=str(dtype)[6:], n=n, tf32=torch.backends.cuda.matmul.allow_tf32)


def test_matmul_one_core(measure):
    if DEVICE.type != "cpu":
        pytest.skip("a CPU core's peak")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        n = max(conv_shapes.GEMM_SIZES)
        fn, flops = conv_shapes.gemm(n)
        # its own dtype label: the float32 row above stays the ceiling of the all-threads figures
        measure("peak matmul float32, one core", "matmul", fn, flops=flops, kind="peak", dtype="float32, one core", n=n)
    finally:
        torch.set_num_threads(threads)
