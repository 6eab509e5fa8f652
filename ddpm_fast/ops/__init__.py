"""Public ops: argument checks, backend choice (impl="auto" | "reference" | "cpu" | "cuda" |
"triton") and torch.library registration. Kernels live in csrc/ and ddpm_fast/kernels/."""
from .attention import attention
from .group_norm import group_norm_silu
from .noise import philox4x32_10, randn
from .step import diffusion_step_

__all__ = ["attention", "diffusion_step_", "group_norm_silu", "philox4x32_10", "randn"]
