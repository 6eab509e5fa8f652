"""attention: softmax(q kᵀ · scale) v for the U-Net's attention blocks, head dims up to 512
(DESIGN §5).

impl="auto": the Triton flash kernel (ddpm_fast/kernels/attention.py) on CUDA tensors,
torch's scaled_dot_product_attention on CPU ones (the reference in float32 where an input is
not finite: SDPA would return 0 for rows the maths makes NaN); "triton" forces the kernel (CPU
tensors run it in Triton's interpreter under TRITON_INTERPRET=1); "reference" materialises the
N×N weights (reference/attention.py)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..contract import ATTENTION_PRECISIONS as PRECISIONS
from ..reference.attention import attention as reference_attention
from ._dispatch import resolve

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 512


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, impl: str = "auto",
              precision: str = "tf32x3") -> torch.Tensor:
    """q [B, heads, N_q, d], k and v [B, heads, N_k, d] (any strides) → [B, heads, N_q, d].

    scale defaults to d^(−1/2). precision applies to float32 inputs on the GPU: "tf32x3" (the
    default: three TF32 tensor-core products, 1e-5 relative accuracy), "ieee" (float32 FMAs,
    1e-5, slower) or "tf32" (one TF32 product, ~1e-3)."""
    _check(q, k, v, scale, precision)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    backend = resolve("attention", impl, q.device, _IMPLEMENTATIONS)
    if impl == "auto" and backend == "reference":
        return _sdpa(q, k, v, scale)
    return _IMPLEMENTATIONS[backend](q, k, v, scale, precision)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    # (under torch.compile the data-dependent choice would break the graph: the reference then)
    if not torch.compiler.is_compiling() and _scores_stay_finite(q, k, v, scale):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    # torch's SDPA (flash and math backends alike) returns 0 for a row whose scores are all
    # NaN or −∞, taking it for a masked-out row; the maths gives NaN there, and so does a plain
    # softmax: the reference, in float32 at least
    return reference_attention(q.float(), k.float(), v.float(), scale).to(q.dtype)


def _scores_stay_finite(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> bool:
    """Whether every score q·k·scale is finite and v is (then no output is masked): a bound
    from the largest magnitudes, which is NaN or ∞ (so False) as soon as an input is not finite.
    Two reads of q and k and one of v, against the N² work of attention itself."""
    bound = q.abs().amax().double() * k.abs().amax().double() * q.shape[-1] * abs(scale)
    return bool(bound < torch.finfo(torch.float32).max / 2) and bool(torch.isfinite(v).all())


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale, precision: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be [B, heads, N, d], got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in DTYPES:
        raise TypeError(f"attention: q, k, v must share one dtype of float32/float16/bfloat16, "
                        f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention: need q [B, heads, N_q, d] and k = v [B, heads, N_k, d], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if min(q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3]) < 1:
        raise ValueError(f"attention: every size must be >= 1, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if q.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"attention: head dim must be <= {MAX_HEAD_DIM}, got {q.shape[3]}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise ValueError(f"attention: scale must be a finite number or None, got {scale!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"attention: precision must be one of {PRECISIONS}, got {precision!r}")


@torch.library.custom_op("ddpm_fast::attention_triton", mutates_args=())
def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, precision: str) -> torch.Tensor:
    from ..kernels import attention as kernels
    out = q.new_empty(q.shape)  # contiguous, whatever q's strides
    kernels.attention(q, k, v, out, scale, precision)
    return out


@attention_triton.register_fake
def _(q, k, v, scale, precision):
    return q.new_empty(q.shape)  # contiguous, whatever q's strides


# "auto" order; "reference" resolved from "auto" (CPU tensors) runs torch's SDPA instead (_sdpa)
_IMPLEMENTATIONS = {
    "triton": lambda q, k, v, scale, precision: torch.ops.ddpm_fast.attention_triton(q, k, v, scale, precision),
    "reference": lambda q, k, v, scale, precision: reference_attention(q, k, v, scale),
}
