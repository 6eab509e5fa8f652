"""Sizes and repetition counts of the benchmark suite, in one place, for three machines:
a GPU (the full sizes: batch 256, 50-step runs), this 2-core CPU (reduced sizes that
finish in minutes) and --quick (smaller still: a smoke test of every benchmark, for CI); and
--check, `make gpu-check`'s cut on a GPU: the real shapes (the CIFAR-10 U-Net's, batch 256)
in about three minutes.

conftest.py sets QUICK and CHECK from --quick and --check before the test modules are imported; they call sizes()
at import to build their parameter lists, and the report labels its figures from the same
values, so a table never claims a size that was not run.
"""
from __future__ import annotations

import dataclasses

import torch

QUICK = False
CHECK = False
ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


@dataclasses.dataclass(frozen=True)
class E2E:
    """One end-to-end workload: a model, its batch (one batch for the step benchmark, the
    sampling run and the breakdown, so each variant is built and compiled once), the run's
    number of steps (1000 = full DDPM; 0 = the one-step benchmark only), whether torch.compile
    (max-autotune) is among its baselines (--quick drops it for the CIFAR-10 net: its compile
    takes minutes on a CPU), the variants it runs (None: every one of workloads.VARIANTS) and
    the timed rounds of its sampling runs (None: Sizes.sample_rounds)."""
    model: str
    batch: int
    sample_steps: int
    compile: bool = True
    variants: tuple | None = None
    sample_rounds: int | None = None


@dataclasses.dataclass(frozen=True)
class Sizes:
    rounds: int                     # timed rounds of one op or one U-Net step
    warmup: int                     # untimed rounds before them
    sample_rounds: int              # timed rounds of a sampling run
    step_shapes: tuple              # diffusion_step
    gn_batches: tuple               # group_norm_silu: the CIFAR-10 U-Net's norm shapes at these batches
    gn_shapes: tuple                # (C, H, W)
    gn_layouts: tuple
    gn_dtypes: tuple
    attn_batch: int
    attn_shapes: tuple              # (N, d)
    attn_dtypes: tuple
    e2e: tuple                      # E2E workloads
    e2e_configs: tuple              # names in CONFIGS
    copy_numel: int                 # peak: device-to-device copy of this many float32
    matmul_n: dict                  # peak: n×n×n matmul per dtype
    profile: str                    # the model of the time breakdown (at its e2e batch)


CONFIGS = {  # like-for-like settings every e2e variant runs in: model dtype and memory layout
    "fp32": (torch.float32, torch.contiguous_format),
    "bf16-cl": (torch.bfloat16, torch.channels_last),
}

_GN_SHAPES = ((128, 32, 32), (256, 16, 16), (256, 8, 8), (256, 4, 4))
_ATTN_SHAPES = ((256, 256), (256, 512), (16, 256))
_LAYOUTS = ("nchw", "channels_last")
# The CPU goals' workloads (benchmarks/report/analysis.py): the CIFAR-10 step at batch 2 and 8
# and its 50-step run at batch 2; the bundled digits model's full 1000-step sampling at batch 8
# and at make sample METHOD=ddpm's 64, there against the goals' baselines only and timed once (a run there
# takes 1.5 minutes with one thread, and each step the same network evaluation).
_CPU_E2E = (E2E("cifar10", 2, 50), E2E("cifar10", 8, 0), E2E("digits", 8, 1000),
            E2E("digits", 64, 1000, sample_rounds=1,
                variants=("eager", "torch.compile U-Net + eager update", "torch.compile max-autotune", "ours",
                          "ours + compile")))
# make gpu-check's end-to-end figures, in the order they run (workloads.cases): what the goals
# judge first — ours with CUDA graphs (the 50,000-sample time), ours, then its baselines, the
# strongest first (torch.compile, diffusers), eager last; max-autotune, whose compile alone
# outlasts the stage's 90 s, is left out
_CHECK_VARIANTS = ("ours + CUDA graph", "ours", "torch.compile", "diffusers", "eager")


def sizes() -> Sizes:
    if ON_GPU and CHECK:
        return Sizes(rounds=10, warmup=2, sample_rounds=2, step_shapes=((256, 3, 32, 32),), gn_batches=(64, 256),
                     gn_shapes=_GN_SHAPES, gn_layouts=_LAYOUTS, gn_dtypes=(torch.float32, torch.bfloat16),
                     attn_batch=256, attn_shapes=_ATTN_SHAPES[:2], attn_dtypes=(torch.bfloat16,),
                     e2e=(E2E("cifar10", 256, 20, variants=_CHECK_VARIANTS),), e2e_configs=("bf16-cl", "fp32"),
                     copy_numel=1 << 28, matmul_n={torch.bfloat16: 8192, torch.float32: 8192}, profile="cifar10")
    if ON_GPU and not QUICK:
        return Sizes(rounds=20, warmup=3, sample_rounds=3, step_shapes=((256, 3, 32, 32), (64, 4, 512, 512)),
                     gn_batches=(256,), gn_shapes=_GN_SHAPES, gn_layouts=_LAYOUTS, gn_dtypes=(torch.float32,),
                     attn_batch=256, attn_shapes=_ATTN_SHAPES, attn_dtypes=(torch.bfloat16, torch.float32),
                     e2e=(E2E("cifar10", 256, 50), E2E("digits", 256, 1000)),
                     e2e_configs=("fp32", "bf16-cl"), copy_numel=1 << 28,
                     matmul_n={torch.bfloat16: 8192, torch.float32: 8192}, profile="cifar10")
    if ON_GPU:
        return Sizes(rounds=5, warmup=1, sample_rounds=2, step_shapes=((256, 3, 32, 32),), gn_batches=(64,),
                     gn_shapes=_GN_SHAPES[:2], gn_layouts=_LAYOUTS, gn_dtypes=(torch.float32,), attn_batch=64,
                     attn_shapes=_ATTN_SHAPES[:1], attn_dtypes=(torch.bfloat16,),
                     e2e=(E2E("cifar10", 32, 10), E2E("digits", 64, 20)), e2e_configs=("fp32", "bf16-cl"),
                     copy_numel=1 << 26, matmul_n={torch.bfloat16: 4096, torch.float32: 4096},
                     profile="cifar10")
    # CPU: float32 only — without AVX512-BF16/AMX, bf16 convolutions are emulated and several
    # times slower than float32, which is not how anyone would run a CPU; the GPU runs bf16.
    if not QUICK:
        return Sizes(rounds=20, warmup=3, sample_rounds=3, step_shapes=((256, 3, 32, 32),), gn_batches=(8,),
                     gn_shapes=_GN_SHAPES, gn_layouts=_LAYOUTS, gn_dtypes=(torch.float32,), attn_batch=8,
                     attn_shapes=_ATTN_SHAPES, attn_dtypes=(torch.float32,),
                     e2e=_CPU_E2E, e2e_configs=("fp32",),
                     copy_numel=1 << 26, matmul_n={torch.bfloat16: 1024, torch.float32: 2048},
                     profile="cifar10")
    return Sizes(rounds=5, warmup=1, sample_rounds=2, step_shapes=((256, 3, 32, 32),), gn_batches=(8,),
                 gn_shapes=(_GN_SHAPES[0], _GN_SHAPES[3]), gn_layouts=_LAYOUTS, gn_dtypes=(torch.float32,),
                 attn_batch=2,
                 attn_shapes=_ATTN_SHAPES[:1], attn_dtypes=(torch.float32,),
                 e2e=(E2E("cifar10", 1, 2, compile=False), E2E("digits", 4, 5)), e2e_configs=("fp32",),
                 copy_numel=1 << 24, matmul_n={torch.bfloat16: 256, torch.float32: 512}, profile="digits")
