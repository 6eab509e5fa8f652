"""Files written whole or not at all, never through someone else's link, never over another
job's output unasked.

atomic_write is the one way this package writes a file: whoever reads it — a user, an FID
tool, a resumed job — finds the old content or the whole new one, never half of it, however
the writer dies; and anyone able to write into the target folder cannot redirect the write
elsewhere (the temporary file is created with O_CREAT | O_EXCL | O_NOFOLLOW under a random
name, and the writer is handed the open file, never a path to reopen). What the package reads
back it opens with open_regular: a FIFO planted in its place is refused by name, never waited on.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import os
import secrets
import shutil
import stat
from pathlib import Path
from typing import BinaryIO, Iterator, Mapping

import torch

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def temporary_name(path: Path) -> Path:
    """A fresh hidden name beside `path`: `.NAME.<random>.tmp` (stale_temporaries finds them)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")


def stale_temporaries(path: str | Path) -> list[Path]:
    """The temporary files and folders atomic writes of `path` (and of `path`.anything, such as
    its manifest) leave behind when their writer is killed."""
    path = Path(path)
    # the name escaped: an output named "a[1].png" or "*.png" must not match other outputs' temporaries
    return sorted(path.parent.glob(f".{glob.escape(path.name)}.*.tmp")) if path.name else []


def remove(path: Path) -> None:
    """Remove a file, a link or a folder tree (a link is removed, never followed)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[BinaryIO]:
    """Yield a new temporary file beside `path`, open for writing in binary; when the block
    succeeds, flush it to disk and rename it over `path` (atomic within one filesystem; a link
    at `path` is replaced, not followed). The file gets the permissions the umask gives new
    files. An OSError names `path` (a full disk says which file it was writing)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(path))
    tmp = temporary_name(path)
    try:
        fd = os.open(tmp, _CREATE, 0o666)
    except OSError as error:
        raise OSError(error.errno, f"cannot create a file in {path.parent}: {error.strerror}", str(path)) from None
    try:
        with os.fdopen(fd, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())  # the data is on disk before the rename makes it visible
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except OSError as error:
        raise OSError(error.errno, f"cannot write it: {error.strerror}", str(path)) from error
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    # the rename itself survives a power cut once the folder's entry is on disk
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: str | Path, data: bytes, overwrite: bool = True) -> bool:
    """Write `data` to `path` atomically. With overwrite=False an existing file is left alone:
    holding exactly `data` it is kept (returns False: nothing written), holding anything else
    it is refused (must_write)."""
    if not must_write(path, data, overwrite):
        return False
    with atomic_write(path) as file:
        file.write(data)
    return True


def must_write(path: str | Path, data: bytes, overwrite: bool) -> bool:
    """Whether write_bytes(path, data, overwrite) writes: False when overwrite=False and `path`
    holds exactly `data` already; a FileExistsError naming --overwrite when it holds anything
    else (asked before the work that makes `data`, where that is cheaper)."""
    path = Path(path)
    if overwrite or not (path.exists() or path.is_symlink()):
        return True
    if holds(path, data):
        return False
    raise FileExistsError(errno.EEXIST, "exists with other content: pass --overwrite to replace it", str(path))


def holds(path: Path, data: bytes) -> bool:
    """Whether `path` is a regular file (not a link) holding exactly `data`."""
    return path.is_file() and not path.is_symlink() and path.stat().st_size == len(data) and path.read_bytes() == data


def write_json(path: str | Path, content: dict) -> None:
    write_bytes(path, (json.dumps(content, indent=1, sort_keys=True) + "\n").encode())


class NotARegularFile(ValueError):
    """A path the package would read is a FIFO, a device, a socket or a folder."""


def check_regular(path: str | Path, mode: int | None = None) -> None:
    """Raise NotARegularFile, naming `path`, unless it is a regular file (a link to one is
    followed). A FIFO planted where a file is expected would block its reader forever."""
    mode = os.stat(path).st_mode if mode is None else mode
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a folder"),
                                             (stat.S_ISSOCK, "a socket")) if test(mode)), "a device")
        raise NotARegularFile(f"{path} is {kind}, not a regular file: refused")


def open_regular(path: str | Path) -> BinaryIO:
    """Open `path` for reading in binary if it is a regular file, else raise NotARegularFile —
    at once: the file is opened without blocking (O_NONBLOCK) and checked before it is read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        check_regular(path, os.fstat(fd).st_mode)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | Path) -> bytes:
    with open_regular(path) as file:
        return file.read()


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open_regular(path) as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes, in name order: the same weights
    give the same checksum whichever file format or path they came from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


CHECKSUM_KEY = "ddpm_fast_tensors_sha256"
METADATA_CHECKSUM_KEY = "ddpm_fast_metadata_sha256"


def metadata_sha256(metadata: Mapping[str, str]) -> str:
    """sha256 of every metadata entry but METADATA_CHECKSUM_KEY's own, in key order: with
    CHECKSUM_KEY among them, it covers the configuration and the tensors alike."""
    entries = {k: v for k, v in metadata.items() if k != METADATA_CHECKSUM_KEY}
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """safetensors' format with the sha256 of the tensor data (tensors_sha256, CHECKSUM_KEY) and
    of the metadata (metadata_sha256, METADATA_CHECKSUM_KEY) in the metadata, which the loaders
    verify. The same tensors and metadata always give the same bytes: safetensors writes the
    metadata in a varying order (a hash map's), so the header is written again in key order."""
    from safetensors.torch import save
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {**(metadata or {}), CHECKSUM_KEY: tensors_sha256(tensors)}
    metadata[METADATA_CHECKSUM_KEY] = metadata_sha256(metadata)
    data = save(tensors, metadata=metadata)
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the tensor data stay 8-byte aligned, as safetensors pads them
    return len(text).to_bytes(8, "little") + text + data[8 + size:]


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None,
                     overwrite: bool = True) -> bool:
    """safetensors_bytes written atomically (as write_bytes, whose `overwrite` it takes)."""
    return write_bytes(path, safetensors_bytes(tensors, metadata), overwrite)


class Busy(ValueError):
    """Another process holds the lock of an output."""


@contextlib.contextmanager
def exclusive(path: str | Path, what: str) -> Iterator[None]:
    """Hold the lock of output `path` — an flock on the hidden file `.NAME.lock` beside it,
    released by the kernel when the process dies, so no lock is ever stale — or raise Busy at
    once. The lock file is removed on the way out. A missing parent folder is created (the
    output's writer would create it anyway)."""
    path = Path(os.path.abspath(path))  # "." has a name once absolute
    lock = path.with_name(f".{path.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Busy(f"{what} {path} is being written by another process (it holds {lock}): wait for it to "
                       f"finish, or choose another output") from None
        try:  # the holder before us may have removed the file we locked: then lock the new one
            if os.stat(lock, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)
