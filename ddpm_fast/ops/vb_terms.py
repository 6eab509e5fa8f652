"""vb_terms: one timestep's term of the variational bound (DESIGN §2.6) per sample, fused, and
every registration of it. Backends: Triton (ddpm_fast/kernels/vb_terms.py), CUDA and CPU C++
(csrc/{cuda,cpu}/vb_terms.*), and the reference (ddpm_fast/reference/vb_terms.py: the row's
arithmetic in float64, beside the paper's equations every backend is checked against)."""
from __future__ import annotations

import torch

from .. import _extension
from ..contract import NUM_TERM_COLUMNS, TERM_COLUMNS
from ..reference.vb_terms import vb_terms_row as reference_row
from ._dispatch import resolve

if _extension.AVAILABLE:
    @torch.library.register_fake("ddpm_fast::vb_terms")
    def _vb_terms_fake(x_start, noise, model_output, row) -> torch.Tensor:
        return x_start.new_empty((x_start.shape[0], 3), dtype=torch.float64)


def vb_terms(x_start: torch.Tensor, noise: torch.Tensor, model_output: torch.Tensor, row: torch.Tensor, *,
             impl: str = "auto") -> torch.Tensor:
    """Per sample, float64 [B, 3]: (the bound's term in nats — the KL of eqs. 6–7, or on a decoder
    row −log p_θ(x_0 | x_1) of eq. 13; Σ(x_0 − x̂0)²; Σ(out − target)²), for x_start (float32
    [B, ...] in [−1, 1] on the 8-bit grid), the noise ε that made x_t = √ᾱ x_0 + √(1−ᾱ) ε, the
    network output at x_t (x_start's shape, float32/float16/bfloat16) and the timestep's row
    (contiguous float64 [8] on x_start's device: a row of ddpm_fast.likelihood.term_table, TERM_COLUMNS;
    float64 because out − target is small beside either for a good network).
    4-D tensors may have any strides, others must be contiguous."""
    _check(x_start, noise, model_output, row)
    backend = resolve("vb_terms", impl, x_start.device, IMPLEMENTATIONS)
    return IMPLEMENTATIONS[backend](x_start, noise, model_output, row)


def _check(x_start, noise, model_output, row) -> None:
    if x_start.dtype != torch.float32 or noise.dtype != torch.float32:
        raise TypeError(f"vb_terms: x_start and noise must be float32, got {x_start.dtype} and {noise.dtype}")
    if model_output.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"vb_terms: model_output must be float32, float16 or bfloat16, got {model_output.dtype}")
    if x_start.dim() < 1 or noise.shape != x_start.shape or model_output.shape != x_start.shape:
        raise ValueError(f"vb_terms: noise and model_output must have x_start's shape {tuple(x_start.shape)}, got "
                         f"{tuple(noise.shape)} and {tuple(model_output.shape)}")
    if x_start.dim() != 4 and not all(t.is_contiguous() for t in (x_start, noise, model_output)):
        raise ValueError("vb_terms: tensors that are not 4-D must be contiguous")
    if row.dtype != torch.float64 or row.shape != (NUM_TERM_COLUMNS,) or not row.is_contiguous():
        raise ValueError(f"vb_terms: row must be a contiguous float64 [{NUM_TERM_COLUMNS}] tensor "
                         f"({', '.join(TERM_COLUMNS)}), got {row.dtype} {tuple(row.shape)}")
    for name, t in (("noise", noise), ("model_output", model_output), ("row", row)):
        if t.device != x_start.device:
            raise ValueError(f"vb_terms: {name} is on {t.device} but x_start is on {x_start.device}")


# A custom_op, as for diffusion_step_triton_: its explicit fake kernel holds under Triton's interpreter.
@torch.library.custom_op("ddpm_fast::vb_terms_triton", mutates_args=())
def vb_terms_triton(x_start: torch.Tensor, noise: torch.Tensor, model_output: torch.Tensor,
                    row: torch.Tensor) -> torch.Tensor:
    from ..kernels import vb_terms as kernels
    result = x_start.new_empty((x_start.shape[0], 3), dtype=torch.float64)
    kernels.vb_terms(x_start, noise, model_output, row, result)
    return result


@vb_terms_triton.register_fake
def _(x_start, noise, model_output, row) -> torch.Tensor:
    return x_start.new_empty((x_start.shape[0], 3), dtype=torch.float64)


def _compiled(x_start, noise, model_output, row) -> torch.Tensor:
    return torch.ops.ddpm_fast.vb_terms(x_start, noise, model_output, row)


# The term without argument checks, by backend in "auto" order.
IMPLEMENTATIONS = {"triton": vb_terms_triton, "cuda": _compiled, "cpu": _compiled, "reference": reference_row}
