"""Public ops, one module per op (DESIGN §4-5): the function, its argument checks, every
torch.library registration and its table of implementations (impl="auto" | "reference" |
"cpu" | "cuda" | "triton"; conv2d's
plans are its own, DESIGN §5.8), read by the shared resolver in _dispatch.py. Kernels live in
csrc/ and ddpm_fast/kernels/, references in ddpm_fast/reference/, all under the op's stem."""
from .attention import attention
from .conv2d import conv2d
from .diffusion_step import diffusion_step_
from .group_norm_silu import group_norm_silu
from .noise import philox4x32_10, randn
from .vb_terms import vb_terms

__all__ = ["attention", "conv2d", "diffusion_step_", "group_norm_silu", "philox4x32_10", "randn", "vb_terms"]
