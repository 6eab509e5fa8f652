"""Samples in [−1, 1] → pictures people look at (PNG grids) and arrays FID tools read.

Every file is written atomically (ddpm_fast/_atomic.py), and .npz files byte for byte
reproducibly: np.savez stamps the current time into the archive, so two runs drawing the same
samples would write different bytes; write_npz stamps a fixed date instead."""
from __future__ import annotations

import io
import math
import os
import re
import zipfile
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from .._atomic import atomic_write, temporary_name, write_bytes

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip archive can hold
GRID_WIDTH = 512  # px: grids are enlarged to at least this width (a 16×16-digit grid is 144 px natively)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] in [−1, 1] → uint8 [N, H, W, C], truncating like the original code and
    improved-diffusion ((x + 1)·127.5 clamped to [0, 255]), so FID numbers compare."""
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, 1 or 3, H, W], got {tuple(x.shape)}")
    return ((x.detach().float().cpu() + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def grid_image(images: np.ndarray, nrow: int | None = None, padding: int = 2, width: int = GRID_WIDTH) -> np.ndarray:
    """uint8 [N, H, W, C] → one uint8 [rows, cols, C] picture, `nrow` images a row (default:
    about square) on a white background, enlarged by the smallest whole factor that makes it at
    least `width` pixels wide (nearest neighbour: each pixel a k×k block, so nothing is blurred
    or invented; 0: the native size)."""
    n, h, w, c = images.shape
    nrow, k = grid_layout(n, h, w, nrow, padding, width)
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        top, left = padding + (i // nrow) * (h + padding), padding + (i % nrow) * (w + padding)
        grid[top:top + h, left:left + w] = image
    return grid.repeat(k, axis=0).repeat(k, axis=1)


def grid_layout(n: int, h: int, w: int, nrow: int | None = None, padding: int = 2,
                width: int = GRID_WIDTH) -> tuple[int, int]:
    """(images a row, enlargement factor) of grid_image's picture of n h×w images, checked before
    any work: a picture larger than PIL opens (Image.MAX_IMAGE_PIXELS, its decompression-bomb
    limit) is refused, since no one could view it."""
    from PIL import Image
    for name, value, low in (("nrow", nrow, 1), ("width", width, 0)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
            raise ValueError(f"grid {name} must be an int >= {low}, got {value!r}")
    nrow = nrow or math.ceil(math.sqrt(n))
    native = (math.ceil(n / nrow) * (h + padding) + padding, nrow * (w + padding) + padding)
    k = max(1, math.ceil(width / native[1]))
    if native[0] * native[1] * k * k > Image.MAX_IMAGE_PIXELS:
        raise ValueError(f"a grid of {n} samples {k * native[1]:,} px wide is {native[0] * native[1] * k * k:,} pixels, "
                         f"more than image viewers open ({Image.MAX_IMAGE_PIXELS:,}, PIL's limit): lower --grid-width "
                         f"or write a .npz or a folder")
    return nrow, k


def write_png(image: np.ndarray, path: str | Path, overwrite: bool = True) -> Path:
    """uint8 [H, W, 1 or 3] → a PNG file (grey or RGB). overwrite=False keeps an existing file
    holding the same picture and refuses one holding another (_atomic.write_bytes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, png_bytes(image), overwrite)
    return path


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 [H, W, 1 or 3] → the bytes of a PNG file (grey or RGB)."""
    from PIL import Image
    encoded = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(encoded, format="PNG")
    return encoded.getvalue()


def save_grid(x: torch.Tensor, path: str | Path, nrow: int | None = None, padding: int = 2,
              overwrite: bool = True, width: int = GRID_WIDTH) -> Path:
    """Write samples as one PNG grid, `nrow` images a row (default: about square), at least
    `width` pixels wide (grid_image)."""
    return write_png(grid_image(to_uint8(x), nrow, padding, width), path, overwrite)


OUTPUT_KINDS = "a .png (one grid), a .npz (arr_0 uint8 [N, H, W, C]) or a folder ending in /"


def output_kind(out: str | Path) -> str:
    """What `--out` asks for: "dir" (ends in / or is a folder), "npz" or "grid" (*.png)."""
    if not str(out):
        raise ValueError(f"output must be {OUTPUT_KINDS}, got an empty name")
    if str(out).endswith(("/", "\\")) or Path(out).is_dir():
        return "dir"
    if Path(out).suffix in (".npz", ".png"):
        return "npz" if Path(out).suffix == ".npz" else "grid"
    raise ValueError(f"output must be {OUTPUT_KINDS}, got {str(out)!r}")


def output_target(out: str | Path) -> Path:
    """The absolute path of the file or folder `out` names (a trailing / dropped): the one target
    every check looks at and every write goes to. The root folder is refused: the job's work
    folder and manifest go beside its output, and "$UNSET_VARIABLE/" is a likely typo."""
    if not str(out):
        raise ValueError("an output name is needed, got an empty one")
    target = Path(os.path.abspath(out))
    if not target.name:
        raise ValueError(f"output {str(out)!r} is the root folder (an unset variable in \"$DIR/\"?): name a folder "
                         f"of its own")
    return target


def work_folder(out: str | Path) -> Path:
    """OUT.parts: where a sampling job keeps its shards until they are merged (shards.py)."""
    target = output_target(out)
    return target.with_name(f"{target.name}.parts")


def finished_manifest(out: str | Path) -> Path:
    """OUT.manifest.json: the record of a finished sampling job (shards.py)."""
    target = output_target(out)
    return target.with_name(f"{target.name}.manifest.json")


def check_output(out: str | Path, suffixes: tuple[str, ...] = (".png", ".npz"), folders: bool = True) -> Path:
    """Raise now, with the reason, if `out` is not a kind of output we write (of `suffixes`, or
    a folder when `folders`: a sampling job's output, with its manifest beside it), if a name the
    job will create is too long for the file system, or if its folder cannot be created and
    written; return its output_target."""
    path = output_target(out)
    folder = str(out).endswith(("/", "\\")) or path.is_dir()
    if folder and not folders:
        raise IsADirectoryError(f"{str(out)!r} is a folder: expected a {' or '.join(suffixes)} file")
    if not folder and path.suffix not in suffixes:
        raise ValueError(f"output must be {OUTPUT_KINDS if folders else ' or '.join(suffixes)}, got {str(out)!r}")
    directory = path if folder else path.parent
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"cannot write {str(out)!r}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {str(out)!r}: no write permission in {existing}")
    longest = temporary_name(finished_manifest(path) if folders else path).name  # the manifest's temporary file
    limit = os.pathconf(existing, "PC_NAME_MAX")
    if len(longest.encode()) > limit:
        raise ValueError(f"output name {path.name!r} is too long: the job also writes {longest!r}, "
                         f"{len(longest.encode())} bytes, and this file system allows {limit} a name")
    return path


def write_samples(chunks: Iterable[tuple[int, np.ndarray]], out: str | Path, shape: tuple[int, ...],
                  nrow: int | None = None, grid_width: int = GRID_WIDTH, kind: str | None = None) -> Path:
    """Write uint8 [N, H, W, C] samples, given in order as (first global index, uint8 [n, H, W, C])
    chunks, where FID tools read them: `*.png` one grid (`nrow` images a row, at least
    `grid_width` pixels wide: grid_image); `*.npz` arr_0 = uint8 [N, H, W, C] (the
    common evaluators' format); a folder one PNG per sample named by its global index (what
    clean-fid and torch-fidelity read). The chunks are streamed: only a grid holds them all.
    `kind`: output_kind(out) of the name as the user gave it, for an output_target `out`."""
    kind, path = kind or output_kind(out), Path(out)
    if kind == "npz":
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_npz_members(path, {"arr_0": (tuple(shape), (images for _, images in chunks))})
    elif kind == "dir":
        path.mkdir(parents=True, exist_ok=True)
        for stale in sample_files(path, start=shape[0]):  # an earlier, larger output's
            stale.unlink()
        for offset, images in chunks:
            for i, image in enumerate(images):
                write_png(image, sample_file(path, offset + i))
    else:
        write_png(grid_image(np.concatenate([images for _, images in chunks]), nrow, width=grid_width), path)
    return path


SAMPLE_FILE = re.compile(r"(\d{6,})\.png")


def sample_file(folder: Path, index: int) -> Path:
    """Where a folder output keeps sample `index`."""
    return folder / f"{index:06d}.png"


def sample_files(folder: Path, start: int = 0) -> list[Path]:
    """The sample PNGs of a folder output whose index is `start` or more, in index order."""
    found = [(int(m[1]), p) for p in folder.iterdir() if (m := SAMPLE_FILE.fullmatch(p.name))] if folder.is_dir() else []
    return [p for i, p in sorted(found) if i >= start]


def write_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    """np.savez's format (uncompressed, np.load reads it), without its timestamp."""
    return _write_npz_members(Path(path), {name: (a.shape, [a]) for name, a in arrays.items()})


def _write_npz_members(path: Path, members: dict[str, tuple[tuple[int, ...], Iterable[np.ndarray]]]) -> Path:
    """Each member: (shape, arrays of one dtype whose bytes, concatenated, fill that shape in C order)."""
    with atomic_write(path) as file, zipfile.ZipFile(file, "w", zipfile.ZIP_STORED) as archive:
        for name, (shape, parts) in members.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            info.external_attr = 0o600 << 16
            with archive.open(info, "w", force_zip64=True) as member:
                written, header = 0, None
                for part in parts:
                    part = np.ascontiguousarray(part)
                    if header is None:
                        header = {"descr": np.lib.format.dtype_to_descr(part.dtype), "fortran_order": False,
                                  "shape": tuple(shape)}
                        np.lib.format.write_array_header_1_0(member, header)  # what np.savez writes
                    member.write(part.data)
                    written += part.size
                if written != math.prod(shape) or header is None:
                    raise ValueError(f"{path}: {name} should hold {math.prod(shape)} values of shape {tuple(shape)}, "
                                     f"got {written}")
    return path


def trajectory_png(frames: torch.Tensor, width: int = GRID_WIDTH) -> bytes:
    """[frames, N, C, H, W] → one PNG's bytes: a row per sample, x̂0 over time from left to right."""
    n_frames, n = frames.shape[:2]
    images = to_uint8(frames.transpose(0, 1).reshape(n * n_frames, *frames.shape[2:]))
    return png_bytes(grid_image(images, nrow=n_frames, width=width))
