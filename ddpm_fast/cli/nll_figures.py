"""The figures of `ddpm-fast nll`: the paper's Figure 5 (rate and distortion of progressive lossy
decompression) and a progressive-decompression grid (x̂_0 from x_t at a few t, beside x_0)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from .._atomic import write_bytes
from ..likelihood import Bound
from .images import grid_image, to_uint8, write_png


def save_rate_distortion(bound: Bound, path: str | Path, title: str) -> Path:
    """Three panels as in the paper's Figure 5: distortion (RMSE of x̂_0, 0–255) and rate (bits/dim
    received) against the reverse steps taken T − t, and distortion against rate."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    curve = bound.curve()
    T = int(bound.timesteps.max()) + 1
    steps = T - curve["timesteps"].numpy()
    rate, distortion = curve["rate"].numpy(), curve["distortion"].numpy()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    axes[0].plot(steps, distortion)
    axes[0].set(xlabel="reverse process steps (T − t)", ylabel="distortion (RMSE, 0–255)")
    axes[1].plot(steps, rate)
    axes[1].set(xlabel="reverse process steps (T − t)", ylabel="rate (bits/dim)")
    axes[2].plot(rate, distortion)
    axes[2].set(xlabel="rate (bits/dim)", ylabel="distortion (RMSE, 0–255)")
    label = "estimate over %d timesteps" % len(bound.timesteps) if bound.estimate else "full bound"
    fig.suptitle(f"{title}: progressive lossy decompression, {bound.terms.shape[0]} images ({label})")
    fig.tight_layout()
    encoded = io.BytesIO()
    fig.savefig(encoded, format="png", dpi=100)
    plt.close(fig)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, encoded.getvalue(), True)
    return path


def save_progressive_grid(x0: torch.Tensor, frames: torch.Tensor, path: str | Path) -> Path:
    """One row an image: its frames (x̂_0 from x_t at descending t, as the receiver gets them: an
    Evaluator.denoised), then x_0 itself in the last column."""
    rows = torch.cat([frames, x0[:, None].to(frames.dtype)], dim=1)  # [N, K + 1, C, H, W]
    n, k = rows.shape[:2]
    pictures = to_uint8(rows.reshape(n * k, *rows.shape[2:]))
    return write_png(grid_image(np.ascontiguousarray(pictures), nrow=k), path)
