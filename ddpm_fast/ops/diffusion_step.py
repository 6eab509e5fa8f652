"""diffusion_step_: the fused sampling update of DESIGN §2, in place on x, with the noise of
DESIGN §3 drawn inside the kernel, and every registration of it. Backends: Triton
(ddpm_fast/kernels/diffusion_step.py), CUDA and CPU C++ (csrc/{cuda,cpu}/diffusion_step.*),
and the reference (ddpm_fast/reference/diffusion_step.py)."""
from __future__ import annotations

import torch

from .. import _extension
from ..contract import NUM_STEP_COLUMNS, STEP_COLUMNS, check_samples
from ..reference import noise as reference_noise
from ..reference.diffusion_step import diffusion_step as reference_step
from ._dispatch import resolve

_H, _W, _GOUT, _GMEAN, _LEARNED = (STEP_COLUMNS.index(name) for name in ("H", "w", "Gout", "Gmean", "learned"))

if _extension.AVAILABLE:
    @torch.library.register_fake("ddpm_fast::diffusion_step_")
    def _diffusion_step_fake(x, model_output, coefs, noise_keys, step_index, seed, sample_offset, history,
                             uncond_output, guidance_grad, variance_output) -> None:
        return None


def diffusion_step_(x: torch.Tensor, model_output: torch.Tensor, coefs: torch.Tensor, noise_keys: torch.Tensor,
                    step_index: torch.Tensor, *, seed: int, sample_offset: int = 0,
                    history: torch.Tensor | None = None, uncond_output: torch.Tensor | None = None,
                    guidance_grad: torch.Tensor | None = None, variance_output: torch.Tensor | None = None,
                    impl: str = "auto", check: bool = True) -> torch.Tensor:
    """x ← C·x̂0 + D·x + E·out + H·x̂0' + Gmean·Σ·g + σ·√Σ·z with x̂0 = A·x + B·out (clipped if the
    row says so), for the row of `coefs` ([S, 14] float32, a StepTable's) at `step_index` (one-element
    int64 tensor on x's device) and z = randn(x.shape, seed, noise_keys[step_index], sample_offset).

    x: float32 [B, ...], any strides when 4-D; model_output: x's shape, float32/float16/bfloat16.
    history: the multistep solvers' buffer (float32, x's shape and strides): x̂0' is read from it,
    then it holds this row's x̂0. Without it the H term is absent (a row with H ≠ 0 is refused when
    check=True). Guidance (DESIGN §2.5): uncond_output (model_output's dtype, shape and strides,
    e.g. the second half of one 2B-batch forward) makes out ← out + w·(out − uncond_output);
    guidance_grad g (float32, x's shape and strides: a classifier's ∇ₓ log p(y | x_t)) adds Gout·g
    to out and Gmean·g to x_prev. Each is absent without its input (a row that needs one is refused
    when check=True). variance_output (model_output's dtype, shape and strides: the second half of a
    2C-channel output, torch.split(out, C, dim=1)) gives a learned row (DESIGN §2.3) its per-element
    variance Σ ("learned_range": eq. 15 of Nichol & Dhariwal 2021; "learned": log Σ itself); Σ = 1
    on every other row, which ignores it. A learned row without it is refused when check=True, and
    writes NaN (raises on the CPU) when not. It excludes history (multistep rows are never learned).
    check=True also validates the step index and the row's finiteness, which reads
    device memory (a sync on CUDA); the sampler passes check=False inside its loop. Returns x."""
    _check(x, model_output, coefs, noise_keys, step_index, seed, sample_offset, history, uncond_output, guidance_grad,
           variance_output)
    if check:
        index = int(step_index.reshape(()).item())
        if not 0 <= index < coefs.shape[0]:
            raise IndexError(f"step index {index} is outside the table of {coefs.shape[0]} rows")
        if not bool(torch.isfinite(coefs[index]).all()):
            raise ValueError(f"coefficient row {index} is not finite: {coefs[index].tolist()}")
        for column, given, what in ((_H, history, "the history buffer that holds the previous row's x̂0"),
                                    (_W, uncond_output, "uncond_output, the unconditional network output"),
                                    (_GOUT, guidance_grad, "guidance_grad, the classifier's gradient"),
                                    (_GMEAN, guidance_grad, "guidance_grad, the classifier's gradient"),
                                    (_LEARNED, variance_output, "variance_output, the network's variance channels")):
            if given is None and float(coefs[index, column]) != 0.0:
                raise ValueError(f"coefficient row {index} has {STEP_COLUMNS[column]} = {float(coefs[index, column])} "
                                 f"≠ 0: pass {what}")
    backend = resolve("diffusion_step", impl, x.device, IMPLEMENTATIONS)
    IMPLEMENTATIONS[backend](x, model_output, coefs, noise_keys, step_index, seed, sample_offset, history,
                             uncond_output, guidance_grad, variance_output)
    return x


def _check(x, model_output, coefs, noise_keys, step_index, seed, sample_offset, history, uncond_output,
           guidance_grad, variance_output) -> None:
    if x.dtype != torch.float32:
        raise TypeError(f"diffusion_step_: x must be float32 (the sampler keeps x in float32), got {x.dtype}")
    if model_output.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"diffusion_step_: model_output must be float32, float16 or bfloat16, got {model_output.dtype}")
    if x.dim() < 1 or model_output.shape != x.shape:
        raise ValueError(f"diffusion_step_: model_output must have x's shape {tuple(x.shape)}, "
                         f"got {tuple(model_output.shape)}")
    if x.dim() != 4 and not (x.is_contiguous() and model_output.is_contiguous()):
        raise ValueError("diffusion_step_: tensors that are not 4-D must be contiguous")
    if coefs.dtype != torch.float32 or coefs.dim() != 2 or coefs.shape[1] != NUM_STEP_COLUMNS or not coefs.is_contiguous():
        raise ValueError(f"diffusion_step_: coefs must be a contiguous float32 [S, {NUM_STEP_COLUMNS}] table "
                         f"({', '.join(STEP_COLUMNS)}), got {coefs.dtype} {tuple(coefs.shape)}")
    if noise_keys.dtype != torch.int64 or noise_keys.shape != (coefs.shape[0],) or not noise_keys.is_contiguous():
        raise ValueError(f"diffusion_step_: noise_keys must be a contiguous int64 [{coefs.shape[0]}] tensor, "
                         f"got {noise_keys.dtype} {tuple(noise_keys.shape)}")
    if step_index.dtype != torch.int64 or step_index.numel() != 1:
        raise ValueError(f"diffusion_step_: step_index must be a one-element int64 tensor, got "
                         f"{step_index.dtype} {tuple(step_index.shape)}")
    for name, t in (("model_output", model_output), ("coefs", coefs), ("noise_keys", noise_keys),
                    ("step_index", step_index)):
        if t.device != x.device:
            raise ValueError(f"diffusion_step_: {name} is on {t.device} but x is on {x.device}")
    # the optional inputs are addressed with the offsets of x (history, guidance_grad) or of model_output
    for name, t, like, like_name, hint in (
            ("history", history, x, "x", " (torch.empty_like(x))"),
            ("uncond_output", uncond_output, model_output, "model_output", " (the other half of the same forward)"),
            ("guidance_grad", guidance_grad, x, "x", ""),
            ("variance_output", variance_output, model_output, "model_output",
             " (the other half of the same 2C-channel output: torch.split(out, C, dim=1))")):
        if t is not None:
            _check_companion(name, t, like, like_name, hint, x.device)
    if history is not None and variance_output is not None:
        raise ValueError("diffusion_step_: history (multistep rows) and variance_output (learned-variance DDPM rows) "
                         "never meet in one table: pass one of them")
    check_samples(seed, sample_offset, x.shape[0])
    if not torch.compiler.is_compiling():  # traced tensors have no addresses; the compiled op checks the real ones
        _check_overlap(x, model_output)
        # history is written, x too: neither may share memory with another input
        pairs = [("history", history, "x", x), ("history", history, "model_output", model_output),
                 ("history", history, "uncond_output", uncond_output), ("history", history, "guidance_grad", guidance_grad),
                 ("uncond_output", uncond_output, "x", x), ("guidance_grad", guidance_grad, "x", x),
                 ("variance_output", variance_output, "x", x)]
        for name, tensor, other_name, other in pairs:
            if tensor is not None and other is not None and _overlaps(tensor, other):
                raise ValueError(f"diffusion_step_: {name} shares memory with {other_name}; it needs its own buffer")


def _check_companion(name: str, t: torch.Tensor, like: torch.Tensor, like_name: str, hint: str,
                     device: torch.device) -> None:
    dtype = "float32" if like_name == "x" else f"{like_name}'s dtype {like.dtype}"
    if t.dtype != like.dtype or t.shape != like.shape or t.stride() != like.stride():
        raise ValueError(f"diffusion_step_: {name} must be {dtype} with {like_name}'s shape {tuple(like.shape)} and "
                         f"strides {like.stride()}{hint}, got {t.dtype} {tuple(t.shape)} strides {t.stride()}")
    if t.device != device:
        raise ValueError(f"diffusion_step_: {name} is on {t.device} but x is on {device}")


def _check_overlap(x: torch.Tensor, model_output: torch.Tensor) -> None:
    # x is written in place: an element stored twice (an expanded view) would be updated twice,
    # and a model_output read through other offsets than x's may already have been overwritten
    if torch._debug_has_internal_overlap(x) == 1:  # 1: at::MemOverlap::Yes
        raise ValueError(f"diffusion_step_: x must not have elements sharing memory (it is updated in place), got "
                         f"strides {x.stride()} for shape {tuple(x.shape)}: pass x.contiguous()")
    same_elements = x.data_ptr() == model_output.data_ptr() and x.stride() == model_output.stride() and \
        x.dtype == model_output.dtype
    if _overlaps(x, model_output) and not same_elements:
        raise ValueError("diffusion_step_: model_output overlaps x in memory other than element for element; "
                         "pass a copy of it")


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    (a0, a1), (b0, b1) = _byte_span(a), _byte_span(b)
    return a0 < b1 and b0 < a1


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) byte addresses a tensor's elements may occupy (empty for no elements)."""
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    extent = 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + extent * t.element_size()


# A custom_op rather than a triton_op: its explicit fake kernel also holds under Triton's
# interpreter (which would run a triton_op's kernel on fake tensors), and the kernel is opaque
# to torch.compile either way since it mutates x. Every parameter is required, in this schema and
# the C++ one (csrc/ops.cpp), defaults living only in the public diffusion_step_: torch 2.11's
# custom_op bumps the version counter of each mutated argument by its schema index after the
# dispatcher has dropped trailing arguments equal to their defaults (IndexError on history at
# args[7] whenever a None is passed; fixed in torch 2.13). tests/test_step.py checks every schema.
@torch.library.custom_op("ddpm_fast::diffusion_step_triton_", mutates_args={"x", "history"})
def diffusion_step_triton_(x: torch.Tensor, model_output: torch.Tensor, coefs: torch.Tensor,
                           noise_keys: torch.Tensor, step_index: torch.Tensor, seed: int, sample_offset: int,
                           history: torch.Tensor | None, uncond_output: torch.Tensor | None,
                           guidance_grad: torch.Tensor | None, variance_output: torch.Tensor | None) -> None:
    from ..kernels import diffusion_step as kernels
    kernels.diffusion_step(x, model_output, coefs, noise_keys, step_index, seed, sample_offset, history,
                           uncond_output, guidance_grad, variance_output)


@diffusion_step_triton_.register_fake
def _(x, model_output, coefs, noise_keys, step_index, seed, sample_offset, history, uncond_output,
      guidance_grad, variance_output) -> None:
    return None


def _compiled(x, model_output, coefs, noise_keys, step_index, seed, sample_offset, history, uncond_output,
              guidance_grad, variance_output) -> None:
    torch.ops.ddpm_fast.diffusion_step_(x, model_output, coefs, noise_keys, step_index, seed, sample_offset, history,
                                        uncond_output, guidance_grad, variance_output)


def _reference(x, model_output, coefs, noise_keys, step_index, seed, sample_offset, history, uncond_output,
               guidance_grad, variance_output) -> None:
    index = int(step_index.reshape(()).item())
    z = reference_noise.draw(tuple(x.shape), seed, int(noise_keys[index]), sample_offset, x.device)
    x.copy_(reference_step(x, model_output, coefs[index], z, history, uncond_output, guidance_grad, variance_output))


# The update without argument checks, by backend in "auto" order: what the sampler's loop calls
# once sample() has checked its arguments.
IMPLEMENTATIONS = {"triton": diffusion_step_triton_, "cuda": _compiled, "cpu": _compiled, "reference": _reference}
