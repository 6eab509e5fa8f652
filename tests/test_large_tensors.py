"""The ops past 2^31 elements, where 32-bit offsets would wrap, on every backend (the C++ CPU
op here; Triton and the CUDA op on a GPU, make gpu-check): one GroupNorm group of more than
2^31 bf16 elements (4.3 GB in, 4.3 GB out), and an in-place step over a batch of more than
2^31 float32 elements (8.6 GB) with a bf16 network output (4.3 GB).

A float64 copy would not fit, so the expectations are computed slice by slice: the group's
statistics and every channel's output moments over the whole tensor, and the reference
maths on spot slices at the start, in the middle, across element 2^31 and at the end, on the
CPU. The tests run one after the other and release their memory when they end (the CI machine
has 24 GiB); they are marked slow but run by default."""
import contextlib
import gc
import math

import pytest
import torch

import ddpm_fast as df
from ddpm_fast.ops import diffusion_step_, group_norm_silu
from ddpm_fast.reference.noise import normal_quads
from ddpm_fast.reference.diffusion_step import diffusion_step as reference_step
from helpers import cuda_or_skip

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("impl", ["cpu", "triton", "cuda"])]
CHUNK = 1 << 24  # elements per slice: 64 MiB as float32


def _device(impl):
    """Triton and the CUDA op on the GPU alone: Triton's interpreter would take hours here."""
    return torch.device("cpu") if impl == "cpu" else cuda_or_skip()


def _available_gib(device):
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2 ** 30
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable")) / 2 ** 20


@contextlib.contextmanager
def _big_tensors(gib, device, *specs):
    """New tensors of the given (shape, dtype) specs on `device`, in a list the test may extend.
    Afterwards each is emptied (set_(): its storage goes as soon as no view holds it), also where
    a failed assertion's traceback still names them, so that the next test finds the memory free."""
    available = _available_gib(device)
    if available < gib:
        pytest.fail(f"this test needs {gib} GiB of free memory, {device} has {available:.1f} GiB available")
    tensors = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in specs]
    try:
        yield tensors
    finally:
        for t in tensors:
            t.set_()
        tensors.clear()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _fill_tiled(flat, seed, scale=1.0, shift=0.0):
    """flat ← a random block of 2^24 + 3 values repeated: cheap to fill, and since its period
    is no power of two, an offset wrapped at 2^31 or 2^32 lands on other values."""
    block = (torch.randn((1 << 24) + 3, generator=torch.Generator().manual_seed(seed)) * scale + shift)
    block = block.to(flat.device, flat.dtype)
    for start in range(0, flat.numel(), block.numel()):
        stop = min(start + block.numel(), flat.numel())
        flat[start:stop] = block[:stop - start]
    return block


def _moments(flat):
    """(Σ v, Σ v²) in float64 over a 1-D tensor, slice by slice: float32 partial sums over rows
    of 1024 (relative error ~1e-7), gathered in float64. The slices go through buffers made
    once: allocating 64 MiB a slice costs more than the sums (fresh pages are zeroed)."""
    values, squares = torch.empty(CHUNK, device=flat.device), torch.empty(CHUNK, device=flat.device)
    row_sums, row_squares = (torch.empty(CHUNK // 1024, device=flat.device) for _ in range(2))
    total, total_squares = 0.0, 0.0
    for start in range(0, flat.numel(), CHUNK):
        n = min(CHUNK, flat.numel() - start)
        part, rows = values[:n], n // 1024
        part.copy_(flat[start:start + n])
        torch.mul(part, part, out=squares[:n])
        torch.sum(part[:rows * 1024].view(rows, 1024), 1, out=row_sums[:rows])
        torch.sum(squares[:rows * 1024].view(rows, 1024), 1, out=row_squares[:rows])
        total += row_sums[:rows].double().sum().item() + part[rows * 1024:].double().sum().item()
        total_squares += row_squares[:rows].double().sum().item() + squares[rows * 1024:n].double().sum().item()
    return total, total_squares


def test_group_norm_silu_one_group_beyond_2_31_elements(impl):
    device = _device(impl)
    c, h, w = 4, 23200, 23200  # 2,152,960,000 elements: 2^31 + 5,476,352
    n, per_channel = c * h * w, h * w
    weight = torch.tensor([1.5, -0.75, 2.0, 0.5], dtype=torch.bfloat16)
    bias = torch.tensor([0.25, -1.0, 0.0, 3.0], dtype=torch.bfloat16)
    with _big_tensors(10, device, ((1, c, h, w), torch.bfloat16)) as big:
        x = big[0]
        _fill_tiled(x.view(-1), seed=0, scale=2.0, shift=3.0)
        for k in range(c):
            x[0, k] += k  # channel means 3, 4, 5, 6: the group mixes them
        y = group_norm_silu(x, weight.to(device), bias.to(device), 1, eps=1e-6, act=False, impl=impl)
        big.append(y)
        assert n > 2 ** 31 and y.dtype == torch.bfloat16 and y.is_contiguous()
        x_moments = [_moments(x[0, k].view(-1)) for k in range(c)]
        y_moments = [_moments(y[0, k].view(-1)) for k in range(c)]
        spots = {start: tuple(t.view(-1)[start:start + 2 ** 16].double().cpu() for t in (x, y))
                 for start in (0, per_channel - 2 ** 15, (1 << 31) - 2 ** 15, n - 2 ** 16)}  # the last: past 2^31
    mean = sum(s for s, _ in x_moments) / n  # the group's float64 statistics, from the slices
    var = sum(q for _, q in x_moments) / n - mean ** 2
    rstd = 1 / math.sqrt(var + 1e-6)
    assert 4.4 < mean < 4.6 and 5.0 < var < 5.5  # channels N(3 + k, 4): the data is what the test made
    weight, bias = weight.double(), bias.double()
    for k in range(c):  # each channel's output moments: y = (x − mean)·rstd·w + b over the whole channel
        x_mean = x_moments[k][0] / per_channel
        x_var = x_moments[k][1] / per_channel - x_mean ** 2
        y_mean = y_moments[k][0] / per_channel
        y_var = y_moments[k][1] / per_channel - y_mean ** 2
        expected_mean = (x_mean - mean) * rstd * weight[k].item() + bias[k].item()
        expected_var = x_var * (rstd * weight[k].item()) ** 2
        assert abs(y_mean - expected_mean) < 2e-3, (k, y_mean, expected_mean)
        assert abs(y_var / expected_var - 1) < 2e-3, (k, y_var, expected_var)
    for start, (x_spot, y_spot) in spots.items():  # element by element, bf16 output rounding
        channel = (start + torch.arange(len(x_spot))) // per_channel
        expected = (x_spot - mean) * rstd * weight[channel] + bias[channel]
        torch.testing.assert_close(y_spot, expected, rtol=1e-2, atol=2e-2, msg=f"slice at {start}")


def test_diffusion_step_over_a_batch_beyond_2_31_elements(impl):
    device = _device(impl)
    shape = (2, 4, 16400, 16400)  # 2,151,680,000 elements: 2^31 + 4,196,352; sample 1 crosses 2^31
    per_sample = math.prod(shape[1:])
    table = df.NoiseSchedule.linear(1000).step_table("ddpm")  # row 500: σ > 0, x̂0 clipped
    index, seed, offset = 500, 2 ** 40 + 17, 7
    with _big_tensors(14, device, (shape, torch.float32), (shape, torch.bfloat16)) as (x, out):
        assert x.numel() > 2 ** 31
        x_block = _fill_tiled(x.view(-1), seed=1, scale=1.5)
        _fill_tiled(out.view(-1), seed=2)
        spots = {}  # (sample, first element) → (x, out) before the update
        crossing = (1 << 31) - per_sample - 2 ** 15  # sample 1's elements around global index 2^31
        for b, e0 in ((0, 0), (0, per_sample - 2 ** 16), (1, crossing), (1, per_sample - 2 ** 16)):
            spots[b, e0] = tuple(t[b].view(-1)[e0:e0 + 2 ** 16].to("cpu", copy=True) for t in (x, out))
        diffusion_step_(x, out, table.coefs.float().to(device), table.noise_keys.to(device),
                        torch.tensor([index], device=device), seed=seed, sample_offset=offset, impl=impl)
        after = {key: x[key[0]].view(-1)[key[1]:key[1] + 2 ** 16].to("cpu", copy=True) for key in spots}
        # every 1021st element (a prime stride, one every 4 KiB), each compared with what the fill
        # wrote there: a range the update skipped would keep its values
        probe = torch.arange(0, x.numel(), 1021, device=device)
        unchanged = int((x.view(-1)[probe] == x_block[probe % x_block.numel()]).sum())
    # ~3 of the 2.1M probes keep their value by chance; a skipped range of 30,000 elements would keep 30
    assert len(probe) > 2 ** 31 // 1021 and unchanged < 30, unchanged
    key = int(table.noise_keys[index])
    for (b, e0), (x_spot, out_spot) in spots.items():
        z = normal_quads(seed, key, torch.tensor([offset + b]), torch.arange(e0 // 4, (e0 + len(x_spot)) // 4))[0]
        expected = reference_step(x_spot.double(), out_spot.double(), table.coefs[index], z.double())
        torch.testing.assert_close(after[b, e0].double(), expected, rtol=1e-5, atol=1e-5,
                                   msg=f"sample {b}, elements from {e0}")
