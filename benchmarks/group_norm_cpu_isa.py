"""The CPU GroupNorm+SiLU against eager PyTorch, interleaved, on one thread, naming the ISA level
and the kernel clone that ran (the AVX2 clone, which most cloud x86 CPUs run, as well as the AVX-512 one).

    OMP_NUM_THREADS=1 python -m benchmarks.group_norm_cpu_isa [--repeats 200] [--shapes 8x256x16x16 ...]
    ATEN_CPU_CAPABILITY=avx2 OMP_NUM_THREADS=1 python -m benchmarks.group_norm_cpu_isa   # eager on AVX2

Each round times every variant once, in turn (fused, eager; with and without the time-embedding
add), so that a change in the machine's load falls on all of them; the table gives the minimum
and the median over the rounds, in ms, and the ratio of the minima. The same inputs every round
(a U-Net's activation is in cache or not depending on the model around it; this is the kernel).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from ddpm_fast import _extension
from ddpm_fast.ops import group_norm_silu

GROUPS = 32
DEFAULT_SHAPES = ("8x256x16x16", "8x256x8x8", "8x128x32x32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES))
    parser.add_argument("--no-add", action="store_true", help="only the variant without the add")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{_extension.cpu_dispatch()}; threads: {torch.get_num_threads()}; "
          f"load: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"{'shape':<14} {'add':<4} {'fused min':>10} {'eager min':>10} {'fused med':>10} {'eager med':>10} {'eager/fused':>12}")
    for text in args.shapes:
        shape = tuple(int(v) for v in text.split("x"))
        g = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=g)
        weight, bias = torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)
        add = torch.randn(shape[:2], generator=g)
        variants = {}
        for with_add in ((False,) if args.no_add else (False, True)):
            a = add if with_add else None
            variants[(with_add, "fused")] = lambda a=a: group_norm_silu(x, weight, bias, GROUPS, add=a, impl="cpu")
            variants[(with_add, "eager")] = (
                (lambda: F.silu(F.group_norm(x + add[:, :, None, None], GROUPS, weight, bias, 1e-6))) if with_add
                else (lambda: F.silu(F.group_norm(x, GROUPS, weight, bias, 1e-6))))
        times = {k: [] for k in variants}
        for fn in variants.values():  # warm-up
            for _ in range(5):
                fn()
        for _ in range(args.repeats):
            for k, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
        for with_add in sorted({k[0] for k in variants}):
            f, e = times[(with_add, "fused")], times[(with_add, "eager")]
            print(f"{text:<14} {'yes' if with_add else 'no':<4} {min(f) * 1e3:>10.3f} {min(e) * 1e3:>10.3f} "
                  f"{statistics.median(f) * 1e3:>10.3f} {statistics.median(e) * 1e3:>10.3f} {min(e) / min(f):>11.2f}×")
    print(f"load after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
