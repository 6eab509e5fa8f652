"""Input rotation (DESIGN §7): when one op's inputs fit in the last-level cache, timing it
over and over on the same buffers measures the cache, not the memory a real U-Net step
streams through. rotate() builds enough input sets to overflow the cache twice over and
hands them out in turn."""
from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Callable

import torch

from benchmarks import settings

MAX_SETS = 16  # bounds the memory spent on copies; 16 sets of a few MB overflow any cache here


def last_level_cache_bytes() -> int:
    if settings.ON_GPU:
        return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20))
    try:
        size = os.sysconf("SC_LEVEL3_CACHE_SIZE")
        if size > 0:
            return size
    except (ValueError, OSError):
        pass
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"), reverse=True):
        text = (index / "size").read_text().strip() if (index / "size").exists() else ""
        if text.endswith("K"):
            return int(text[:-1]) << 10
        if text.endswith("M"):
            return int(text[:-1]) << 20
    return 32 << 20


def rotate(make: Callable[[int], tuple], bytes_per_set: int) -> tuple[Callable[[], tuple], int]:
    """make(i) builds input set i (fresh random data each); returns (next_set, count): next_set()
    cycles through `count` sets, as many as it takes to exceed twice the last-level cache, at
    most MAX_SETS (a cache larger than that is reported in the results as it is)."""
    count = max(1, min(MAX_SETS, -(-2 * last_level_cache_bytes() // max(bytes_per_set, 1))))
    sets = itertools.cycle([make(i) for i in range(count)])
    return (lambda: next(sets)), count
