"""Atomic file writes: whoever reads the file — a user, an FID tool, a resumed job — finds the
old content or the whole new one, never half of it, however the writer dies."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator

import torch


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; when the block succeeds, flush it to disk
    and rename it over `path` (os.replace: atomic within one filesystem). The temporary name is
    hidden (leading dot) so tools listing an output folder skip it, and holds the pid so that
    processes writing different files never share one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # the data is on disk before the rename makes it visible
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, content: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(content, indent=1, sort_keys=True) + "\n")


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, atomically, and with the permissions the umask gives new files:
    safetensors itself creates them 0600, which hides a trained model from the machine's other
    users."""
    from safetensors.torch import save_file
    umask = os.umask(0)
    os.umask(umask)
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o666 & ~umask)
