"""Training images as tensors in [−1, 1]: scikit-learn's digits (offline, with their labels) or a folder."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .._atomic import open_regular

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def digits_dataset(resolution: int = 16) -> torch.Tensor:
    """scikit-learn's 1,797 handwritten digits (8×8, 17 grey levels), bilinearly upsampled to
    `resolution`, as float32 [1797, 1, resolution, resolution] in [−1, 1]."""
    images = torch.from_numpy(_load_digits().images.astype(np.float32) / 16.0)[:, None]  # [N, 1, 8, 8] in [0, 1]
    return (upsample_digits(images, resolution) * 2 - 1).clamp(-1, 1).contiguous()


DIGITS_CLASSES = 10


def digits_labels() -> torch.Tensor:
    """The digits' classes 0–9, int64 [1797], in digits_dataset's order."""
    return torch.from_numpy(_load_digits().target.astype(np.int64))


def _load_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("the digits data set ships with scikit-learn: pip install scikit-learn") from error
    return load_digits()


def upsample_digits(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """The (linear) map from 8×8 digits to the training resolution: bilinear interpolation."""
    return F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)


def image_folder_dataset(folder: str | Path, resolution: int, channels: int = 3) -> torch.Tensor:
    """Every image in `folder` (recursively), centre-cropped to a square and resized to
    `resolution`, as float32 [N, channels, resolution, resolution] in [−1, 1]."""
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    mode = {1: "L", 3: "RGB"}[channels]
    return torch.stack([_square_image(path, mode, resolution) for path in paths]).contiguous()


def _square_image(path: Path, mode: str, resolution: int) -> torch.Tensor:
    """One image file, centre-cropped and resized: float32 [channels, resolution, resolution]. A
    file that is not a readable image, or would decompress to more pixels than PIL allows (a
    decompression bomb), is a ValueError naming it."""
    from PIL import Image
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # refused, not merely warned about
        try:
            with open_regular(path) as file, Image.open(file) as image:
                image = image.convert(mode)
        except (OSError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise ValueError(f"{path} is not a readable image: {error}") from None
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
    array = np.asarray(image, dtype=np.float32).reshape(resolution, resolution, len(mode))
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1
