"""Honest timing on a device that runs asynchronously (DESIGN §7): a timed or warm-up call ends
only when the device work it queued has finished."""
from __future__ import annotations

from typing import Callable

import torch


def synchronized(fn: Callable, device: torch.device) -> Callable[[], None]:
    """fn followed by a device synchronisation on CUDA; fn itself elsewhere."""
    if device.type == "cuda":
        def run():
            fn()
            torch.cuda.synchronize(device)
        return run
    return fn
