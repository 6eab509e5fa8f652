"""The noise stream of DESIGN §3 as public ops: `randn` (what the sampler draws) and
`philox4x32_10` (its raw words, for tests and other backends). Backends: the compiled CPU
and CUDA kernels (csrc/{cpu,cuda}/noise.*) and the plain-PyTorch reference
(ddpm_fast/reference/noise.py)."""
from __future__ import annotations

from typing import Sequence

import torch

from .. import _extension
from ..contract import SEED_RANGE, UINT32_RANGE, check_int_range, check_noise_args
from ..reference import noise as reference
from ._dispatch import resolve

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
    if counter.numel() and (int(counter.min()) < 0 or int(counter.max()) >= UINT32_RANGE):
        raise ValueError("counter words must lie in [0, 2^32)")
    check_int_range("seed", seed, SEED_RANGE)
    backend = resolve("philox4x32_10", impl, counter.device, _PHILOX_IMPLEMENTATIONS)
    return _PHILOX_IMPLEMENTATIONS[backend](counter, seed)


def randn(shape: Sequence[int], *, seed: int, step: int, sample_offset: int = 0,
          device: torch.device | str | None = None, impl: str = "auto") -> torch.Tensor:
    """float32 Gaussian noise of `shape` = [B, ...] for global samples sample_offset ..
    sample_offset + B − 1 under noise key `step` (T for x_T, i for the update at timestep i).

    Sample j's noise depends only on (seed, sample_offset + j, step), never on the batch it is
    drawn in, the memory layout or the backend."""
    shape = tuple(shape)
    check_noise_args(shape, seed, step, sample_offset)
    device = torch.device(device) if device is not None else torch.device("cpu")
    backend = resolve("randn", impl, device, RANDN_IMPLEMENTATIONS)
    return RANDN_IMPLEMENTATIONS[backend](shape, seed, step, sample_offset, device)


def _philox_compiled(counter: torch.Tensor, seed: int) -> torch.Tensor:
    as_int32 = torch.where(counter >= 1 << 31, counter - UINT32_RANGE, counter).to(torch.int32)
    return torch.ops.ddpm_fast.philox4x32_10(as_int32, seed).to(torch.int64) & 0xFFFFFFFF


def _randn_compiled(shape: tuple[int, ...], seed: int, step: int, sample_offset: int,
                    device: torch.device) -> torch.Tensor:
    out = torch.empty(shape, dtype=torch.float32, device=device)
    torch.ops.ddpm_fast.randn_(out, seed, step, sample_offset)
    return out


_PHILOX_IMPLEMENTATIONS = {"cuda": _philox_compiled, "cpu": _philox_compiled, "reference": reference.philox4x32_10}
# Unchecked draws by backend, in "auto" order; the sampler calls them after checking once.
RANDN_IMPLEMENTATIONS = {"cuda": _randn_compiled, "cpu": _randn_compiled, "reference": reference.draw}
