"""Samples in [−1, 1] → pictures people look at (PNG grids) and arrays FID tools read."""
from __future__ import annotations

import math
import os
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


OUTPUT_KINDS = "a .png (one grid), a .npz (arr_0 uint8 [N, H, W, C]) or a folder ending in /"


def check_output(out: str | Path, suffixes: tuple[str, ...] = (".png", ".npz")) -> Path:
    """Raise now, with the reason, if `out` is not a kind of output we write or its folder
    cannot be created and written; return it as a Path."""
    path = Path(out)
    folder = str(out).endswith(("/", "\\")) or path.is_dir()
    if not folder and path.suffix not in suffixes:
        kinds = OUTPUT_KINDS if suffixes == (".png", ".npz") else " or ".join(suffixes)
        raise ValueError(f"output must be {kinds}, got {str(out)!r}")
    directory = path if folder else path.parent
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"cannot write {str(out)!r}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {str(out)!r}: no write permission in {existing}")
    return path


def save_samples(x: torch.Tensor, out: str | Path, sample_offset: int = 0) -> Path:
    """Write samples where FID tools read them: `*.png` one grid; `*.npz` arr_0 = uint8
    [N, H, W, C] (the common evaluators' format); a folder (ending in / or existing) one PNG
    per sample named by its global index (what clean-fid and torch-fidelity read)."""
    from PIL import Image
    path = Path(out)
    if str(out).endswith(("/", "\\")) or path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(to_uint8(x)):
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path / f"{sample_offset + i:06d}.png")
        return path
    if path.suffix == ".npz":
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, arr_0=to_uint8(x))
        return path
    if path.suffix == ".png":
        return save_grid(x, path)
    raise ValueError(f"output must be {OUTPUT_KINDS}, got {str(out)!r}")


def save_trajectory(frames: torch.Tensor, path: str | Path) -> Path:
    """[frames, N, C, H, W] → one PNG: a row per sample, x̂0 over time from left to right."""
    n_frames, n = frames.shape[:2]
    return save_grid(frames.transpose(0, 1).reshape(n * n_frames, *frames.shape[2:]), path, nrow=n_frames)
