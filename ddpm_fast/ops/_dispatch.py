"""The impl= choice shared by every public op: validate the name, resolve "auto"."""
from __future__ import annotations

import torch

from .. import _extension

IMPLS = ("auto", "reference", "cpu", "cuda", "triton")


def resolve(op: str, impl: str, device: torch.device, available: tuple[str, ...]) -> str:
    """The backend that runs `op` on `device`: `impl` itself after checking it fits the device
    and is built, or for "auto" the fastest of `available` (in order) that is."""
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        for candidate in available:
            if _usable(candidate, device):
                return candidate
        return "reference"
    if impl != "reference" and impl not in available:
        raise NotImplementedError(f"{op}: no {impl!r} implementation; this op has {('reference',) + available}")
    if impl in ("cpu", "cuda") and device.type != impl:
        raise ValueError(f"{op}: impl={impl!r} needs {impl} tensors, got tensors on {device}")
    if impl == "triton" and device.type != "cuda" and not _triton_interpreter():
        raise ValueError(f"{op}: impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device}")
    if impl in ("cpu", "cuda"):
        _extension.require(op)
        if impl == "cuda" and not _extension.cuda_built():
            raise _extension.CompiledOpsUnavailable(
                f"ddpm_fast::{op}: the compiled library was built without its CUDA kernels (no nvcc at build time)")
    return impl


def _triton_interpreter() -> bool:
    import os
    return os.environ.get("TRITON_INTERPRET") == "1"


def _usable(candidate: str, device: torch.device) -> bool:
    if candidate == "cpu":
        return device.type == "cpu" and _extension.AVAILABLE
    if candidate == "cuda":
        return device.type == "cuda" and _extension.cuda_built()
    if candidate == "triton":
        return device.type == "cuda"
    return candidate == "reference"
