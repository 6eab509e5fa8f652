"""A 2-D convolution with the residual add after it, written plainly (DESIGN §5.8): what the
packed oneDNN path of ops.conv2d must equal, run in float64."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, padding: int,
           add: torch.Tensor | None = None) -> torch.Tensor:
    """conv(x; weight) + bias (+ add): the ResBlock's last convolution with its skip connection."""
    out = F.conv2d(x, weight, bias, stride, padding)
    return out if add is None else out + add
