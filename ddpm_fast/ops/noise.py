"""The noise stream of DESIGN §3 as public ops: `randn` (what the sampler draws) and
`philox4x32_10` (its raw words, for tests and other backends). Backends: the compiled CPU
and CUDA kernels (csrc/{cpu,cuda}/noise.*) and the plain-PyTorch reference."""
from __future__ import annotations

from typing import Sequence

import torch

from .. import _extension
from ..reference import noise as reference
from ._dispatch import resolve

_COMPILED = ("cpu", "cuda")

if _extension.AVAILABLE:
    @torch.library.register_fake("ddpm_fast::philox4x32_10")
    def _philox_fake(counter: torch.Tensor, seed: int) -> torch.Tensor:
        return torch.empty_like(counter, memory_format=torch.contiguous_format)

    @torch.library.register_fake("ddpm_fast::randn_")
    def _randn_fake(out: torch.Tensor, seed: int, step: int, sample_offset: int) -> None:
        return None


def philox4x32_10(counter: torch.Tensor, seed: int, impl: str = "auto") -> torch.Tensor:
    """Philox4x32-10 words of `counter` ([..., 4] integers in [0, 2^32)) under key
    (seed mod 2^32, seed >> 32), as int64 [..., 4]."""
    if counter.dim() < 1 or counter.shape[-1] != 4 or counter.dtype.is_floating_point or counter.dtype == torch.bool:
        raise ValueError(f"counter must be an integer tensor of shape [..., 4], got {counter.dtype} {tuple(counter.shape)}")
    counter = counter.to(torch.int64)
    if counter.numel() and (int(counter.min()) < 0 or int(counter.max()) >= reference.UINT32_RANGE):
        raise ValueError("counter words must lie in [0, 2^32)")
    if not isinstance(seed, int) or not 0 <= seed < reference.SEED_RANGE:
        raise ValueError(f"seed must be an int in [0, 2^63), got {seed!r}")
    backend = resolve("philox4x32_10", impl, counter.device, _COMPILED)
    if backend == "reference":
        return reference.philox4x32_10(counter, seed)
    as_int32 = torch.where(counter >= 1 << 31, counter - reference.UINT32_RANGE, counter).to(torch.int32)
    return torch.ops.ddpm_fast.philox4x32_10(as_int32, seed).to(torch.int64) & 0xFFFFFFFF


def randn(shape: Sequence[int], *, seed: int, step: int, sample_offset: int = 0,
          device: torch.device | str | None = None, impl: str = "auto") -> torch.Tensor:
    """float32 Gaussian noise of `shape` = [B, ...] for global samples sample_offset ..
    sample_offset + B − 1 under noise key `step` (T for x_T, i for the update at timestep i).

    Sample j's noise depends only on (seed, sample_offset + j, step), never on the batch it is
    drawn in, the memory layout or the backend."""
    shape = tuple(shape)
    reference.check_noise_args(shape, seed, step, sample_offset)
    device = torch.device(device) if device is not None else torch.device("cpu")
    backend = resolve("randn", impl, device, _COMPILED)
    if backend == "reference":
        return reference.randn(shape, seed, step, sample_offset, device)
    out = torch.empty(shape, dtype=torch.float32, device=device)
    torch.ops.ddpm_fast.randn_(out, seed, step, sample_offset)
    return out
