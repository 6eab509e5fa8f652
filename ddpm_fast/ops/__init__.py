"""Public ops: argument checks, backend choice (impl="auto" | "reference" | "cpu" | "cuda" |
"triton") and torch.library registration. Kernels live in csrc/ and ddpm_fast/kernels/."""
from .noise import philox4x32_10, randn

__all__ = ["philox4x32_10", "randn"]
