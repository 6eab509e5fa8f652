"""Samples in [−1, 1] → pictures people look at (PNG grids) and arrays FID tools read."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] in [−1, 1] → uint8 [N, H, W, C], truncating like the original code and
    improved-diffusion ((x + 1)·127.5 clamped to [0, 255]), so FID numbers compare."""
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, 1 or 3, H, W], got {tuple(x.shape)}")
    return ((x.detach().float().cpu() + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_grid(x: torch.Tensor, path: str | Path, nrow: int | None = None, padding: int = 2) -> Path:
    """Write samples as one PNG grid, `nrow` images a row (default: about square)."""
    from PIL import Image
    images = to_uint8(x)
    n, h, w, c = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        top, left = padding + (i // nrow) * (h + padding), padding + (i % nrow) * (w + padding)
        grid[top:top + h, left:left + w] = image
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)
    return path
