"""Where one U-Net step's time goes (torch.profiler): convolutions/GEMMs, attention, and
everything else — norms, activations, the update, copies, framework overhead — which is the
part fused kernels can remove. The GEMM share bounds what any fusion can reach end to end.

On a GPU the shares are of kernel time on the device, and `idle` is the wall time no kernel
ran (launch gaps); on a CPU they are of the operators' self time on the calling thread (the
intra-op threads work inside those operators). Kernels that torch.compile generates on a CPU
are not separate profiler events: they count as "other", inside the compiled region.
"""
from __future__ import annotations

import re
import time
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks import settings

# Checked in this order: attention first (flash/SDPA kernels), then anything matmul-like —
# cuBLAS/cuBLASLt (gemm, nvjet, xmma, cutlass), cuDNN and oneDNN convolutions, aten GEMMs,
# and max-autotune's Triton templates (triton_tem_*).
CATEGORIES = (
    ("attention", re.compile(r"attention|attn|sdpa|flash|fmha", re.I)),
    ("conv/GEMM", re.compile(r"conv|gemm|\bmm\b|addmm|bmm|baddbmm|matmul|linear|xmma|cutlass|nvjet|cudnn|mkldnn|"
                             r"triton_tem|wgmma|hgmma", re.I)),
)
SHARES = ("conv/GEMM", "attention", "other")
OVERHEAD = "Python and framework, outside operators"  # the step's own self time


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if pattern.search(name):
            return label
    return "other"


def profile_step(step: Callable[[], None], steps: int = 3) -> dict:
    """Run `step` `steps` times under the profiler; the shares of each category (summing to 1),
    the device's idle share of the wall time (GPUs), the wall time per step, and the three
    costliest "other" entries."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if settings.ON_GPU else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            with record_function(OVERHEAD):
                step()
        if settings.ON_GPU:
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    times: dict[str, float] = {}
    on_device = _device_entries(prof) if settings.ON_GPU else []
    entries = on_device or [(e.key, e.self_cpu_time_total) for e in prof.key_averages()]
    for name, us in entries:
        name = re.sub(r"CompiledFxGraph \w+", "CompiledFxGraph", name).strip("# ")  # a hash names no kernel
        times[name] = times.get(name, 0.0) + us
    total = sum(times.values()) or 1.0
    shares = {label: 0.0 for label in SHARES}
    for name, us in times.items():
        shares[category(name)] += us / total
    others = sorted((us, name) for name, us in times.items() if category(name) == "other")[-3:]
    result = {f"share {label}": value for label, value in shares.items()}
    result.update(wall_per_step_s=wall / steps, measured_on="device kernels" if on_device else "cpu self time",
                  top_other=[f"{name[:60]} {us / total:.1%}" for us, name in reversed(others)])
    if on_device:
        result["share idle"] = max(0.0, 1.0 - total * 1e-6 / wall)
    return result


def _device_entries(prof) -> list[tuple[str, float]]:
    """(kernel name, device µs) of every kernel; empty when the profiler saw none."""
    cuda = getattr(torch.autograd.DeviceType, "CUDA", None)
    entries = []
    for event in prof.key_averages():
        us = getattr(event, "self_device_time_total", None)
        if us is None:
            us = getattr(event, "self_cuda_time_total", 0.0)
        if getattr(event, "device_type", None) == cuda and us > 0:
            entries.append((event.key, us))
    return entries
