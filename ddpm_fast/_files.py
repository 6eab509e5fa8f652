"""Writing weights files the way users expect: whole or not at all, readable like any file."""
from __future__ import annotations

import os
from pathlib import Path

import torch


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` to `path` atomically (temporary file + rename: a killed process never
    leaves half a file) with the permissions the umask gives new files — safetensors itself
    creates them 0600, which hides a trained model from the other users of a machine."""
    from safetensors.torch import save_file
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    tmp.replace(path)
