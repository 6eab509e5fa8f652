"""The impl= choice shared by every public op: validate the name against the op's table of
implementations, resolve "auto" to the first of them (in the table's order) usable on the
tensors' device."""
from __future__ import annotations

import functools
import os
from typing import Callable, Mapping

import torch

from .. import _extension
from ..contract import BACKENDS, check_choice


def resolve(op: str, impl: str, device: torch.device, implementations: Mapping[str, Callable]) -> str:
    """The backend that runs `op` on `device`: `impl` itself after checking it fits the device
    and is built, or for "auto" the first usable key of `implementations` ("reference" last)."""
    check_choice(f"{op}: impl", impl, BACKENDS)
    if impl == "auto":
        return next(candidate for candidate in implementations if _usable(candidate, device))
    if impl not in implementations:
        raise NotImplementedError(f"{op}: no {impl!r} implementation; this op has {tuple(implementations)}")
    if impl in ("cpu", "cuda") and device.type != impl:
        raise ValueError(f"{op}: impl={impl!r} needs {impl} tensors, got tensors on {device}")
    if impl == "triton":
        if not triton_available():
            raise ModuleNotFoundError(f"{op}: impl='triton' needs the triton package, which is not installed")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"{op}: impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), "
                             f"got {device}")
    if impl in ("cpu", "cuda"):
        _extension.require(op)
        if impl == "cuda" and not _extension.cuda_built():
            raise _extension.CompiledOpsUnavailable(
                f"ddpm_fast::{op}: the compiled library was built without its CUDA kernels (no nvcc at build time)")
    return impl


@functools.cache
def triton_available() -> bool:
    """Whether triton imports; asked only where a Triton kernel could run (CUDA tensors, or
    impl="triton"), so `import ddpm_fast` itself never needs triton."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _usable(candidate: str, device: torch.device) -> bool:
    if candidate == "cpu":
        return device.type == "cpu" and _extension.AVAILABLE
    if candidate == "cuda":
        return device.type == "cuda" and _extension.cuda_built()
    if candidate == "triton":
        return device.type == "cuda" and triton_available()
    return candidate == "reference"
