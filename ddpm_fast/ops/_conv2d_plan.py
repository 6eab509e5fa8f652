"""Which plan of ops.conv2d runs a convolution: measured once per process for each shape (DESIGN §5.8).

The first call with a new key — input shape and layout, the conv's geometry, the dtype, whether
a residual is added, torch's thread count — runs every plan on that very input, one round to
warm up (the packed plan packs its weight there) and REPEATS timed rounds interleaved, and keeps
the plan of the least time. Each plan reads x in the layout it arrives in, so its time includes
whatever layout conversion it makes (the packed op's input reorder); neither plan copies a layout
explicitly. The choice holds for the process: a sampling job sees one or two shapes per conv.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

PLANS = ("torch", "packed")
REPEATS = 3

_choices: dict[tuple, str] = {}


def key(conv, x: torch.Tensor, add: torch.Tensor | None) -> tuple:
    layout = "nchw" if x.is_contiguous() else "channels_last" if x.is_contiguous(
        memory_format=torch.channels_last) else "strided"
    return (tuple(x.shape), layout, tuple(conv.weight.shape), tuple(conv.stride), tuple(conv.padding),
            tuple(conv.dilation), conv.groups, x.dtype, add is not None, torch.get_num_threads())


def choose(conv, x: torch.Tensor, add: torch.Tensor | None, run: Callable) -> str:
    """The measured faster plan for this call's key (measuring it on this call if new)."""
    k = key(conv, x, add)
    plan = _choices.get(k)
    if plan is None:
        plan = _choices[k] = _measure(conv, x, add, run)
    return plan


def _measure(conv, x: torch.Tensor, add: torch.Tensor | None, run: Callable) -> str:
    best = dict.fromkeys(PLANS, float("inf"))
    for round_ in range(1 + REPEATS):
        for plan in PLANS:
            start = time.perf_counter()
            run(plan, conv, x, add)
            if round_:
                best[plan] = min(best[plan], time.perf_counter() - start)
    return min(PLANS, key=best.__getitem__)


def choices() -> dict[tuple, str]:
    """The plans chosen so far in this process, by key (for reports and tests)."""
    return dict(_choices)
