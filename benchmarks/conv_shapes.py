"""Every convolution of a U-Net forward, timed in each way the CPU can run it (DESIGN §5.8):
today's F.conv2d on NCHW (the U-Net before packed convolutions), F.conv2d on channels_last,
the packed plan on channels_last (ops.conv2d impl="packed") and the plan ops.conv2d's
calibration chooses in the network, where after the first convolution every activation is
channels_last. Interleaved round by round, the fastest round kept (a shared machine's waits
for a core only ever add time)."""
from __future__ import annotations

import time
from typing import Callable

import torch

from ddpm_fast import ops
from ddpm_fast.ops import _conv2d_plan
from ddpm_fast.ops.conv2d import PackedConv2d, run



def interleaved(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each fn's timed rounds, the fns run in turn within every round."""
    times = {name: [] for name in fns}
    for round_ in range(warmup + rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


GEMM_SIZES = (512, 1024)


def gemm(n: int) -> tuple[Callable[[], torch.Tensor], int]:
    """A float32 n×n×n GEMM (torch.mm: MKL/oneDNN) on random data, and its 2n³ flops."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    return (lambda: torch.mm(a, b, out=out)), 2 * n ** 3


def gemm_peak_gflops(rounds: int = 15) -> float:
    """The FMA peak as GEMMs reach it on the threads torch has now: the best rate of GEMM_SIZES,
    each over its fastest of `rounds` (short runs: on a shared core the fastest is one that
    was not interrupted)."""
    rates = []
    for n in GEMM_SIZES:
        fn, work = gemm(n)
        rates.append(work / min(interleaved({"mm": fn}, rounds, warmup=2)["mm"]) / 1e9)
    return max(rates)


def convolutions(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> list[tuple[PackedConv2d, tuple, bool]]:
    """(conv, input shape, with the residual add) of each distinct convolution of one forward:
    distinct geometry (input shape, weight shape, stride, padding, residual), the first module
    of each standing for the others."""
    seen, found = set(), []

    def record(module, args, kwargs):
        key = (tuple(args[0].shape), tuple(module.weight.shape), module.stride, module.padding,
               kwargs.get("add") is not None, module is model.conv_in)
        if key not in seen:
            seen.add(key)
            found.append((module, tuple(args[0].shape), kwargs.get("add") is not None))
    hooks = [m.register_forward_pre_hook(record, with_kwargs=True) for m in model.modules()
             if isinstance(m, PackedConv2d)]
    try:
        with torch.inference_mode():
            model(x, t)
    finally:
        for hook in hooks:
            hook.remove()
    return found


def flops(conv: PackedConv2d, shape: tuple) -> int:
    out = ops.conv2d(conv, torch.empty(shape), impl="torch").shape
    return 2 * out.numel() * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]


def table(model, batch: int, rounds: int) -> list[dict]:
    """One row per distinct (conv, input shape, residual) of the U-Net `model` at `batch`: its
    GFLOP/s in each way. "chosen" is the plan for the layout the conv's input arrives in: NCHW
    for the first convolution (the image), channels_last after it."""
    x = torch.randn(batch, model.in_channels, model.resolution, model.resolution)
    rows = []
    for conv, shape, residual in convolutions(model, x, torch.full((batch,), 500)):
        nchw = torch.randn(shape)
        last = nchw.contiguous(memory_format=torch.channels_last)
        add = None
        if residual:
            add = torch.randn(ops.conv2d(conv, nchw, impl="torch").shape).contiguous(memory_format=torch.channels_last)
        add_nchw = None if add is None else add.contiguous()
        with torch.inference_mode():
            arriving = nchw if conv is model.conv_in else last
            chosen = _conv2d_plan.choose(conv, arriving, add, run)
            times = interleaved({
                "today NCHW": lambda: ops.conv2d(conv, nchw, add_nchw, impl="torch"),
                "channels_last": lambda: ops.conv2d(conv, last, add, impl="torch"),
                "packed channels_last": lambda: ops.conv2d(conv, last, add, impl="packed"),
                "chosen": lambda: ops.conv2d(conv, arriving, add, impl=chosen),
            }, rounds)
        work = flops(conv, shape)
        rows.append(dict(shape=shape, out_channels=conv.out_channels, kernel=conv.kernel_size[0],
                         stride=conv.stride[0], residual=residual, chosen=chosen, flops=work,
                         gflops={way: work / min(s) / 1e9 for way, s in times.items()}))
    return rows

