"""Sampling jobs that scale across processes and survive being killed.

The global sample indices 0 .. N−1 are cut into fixed-size shards, a multiple of the
micro-batch, so a shard is drawn in the same micro-batches whichever process draws it, and the
noise contract (DESIGN §3: noise keyed by global sample index) makes its samples the same
whatever the number of processes. The shards still to draw are dealt round-robin to the ranks
of a World (ddpm_fast/cli/distributed.py); each rank writes its finished shards atomically into a
work folder beside the output; after each round rank 0 records the completed index ranges in
the manifest; when all are done rank 0 merges them into the output, checking that every index
is there exactly once. A killed job rerun with resume=True draws only the missing shards.

    OUT.parts/manifest.json                       settings, completed index ranges, launches
    OUT.parts/samples-0000000064-0000000128.npz   one shard: images uint8 [n, H, W, C],
                                                  indices int64 [n], settings_sha256
    OUT.manifest.json                             the manifest of the finished job, with the
                                                  sha256 of OUT (the work folder is removed)
    .OUT.lock                                     held (flock) by the job writing OUT

The output's manifest is renamed into place after the output, so an output whose manifest does
not record its sha256 is not a finished job: never silently replaced (--overwrite replaces it),
and never taken for done. Rerunning a finished job with the same settings is a no-op.

With the same micro-batch, thread count and deterministic algorithms, a sharded, interrupted or
resumed job writes exactly the bytes of an uninterrupted single-process one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .._atomic import (NotARegularFile, exclusive, file_sha256, open_regular, read_regular, remove, stale_temporaries,
                      tensors_sha256, write_json)
from ..contract import NOISE_STREAM_VERSION, check_samples
from ..sampler import Sampler
from .distributed import World
from .images import (GRID_WIDTH, finished_manifest, grid_layout, output_kind, output_target, sample_file, sample_files, to_uint8,
                     work_folder, write_npz, write_samples)

FORMAT = "ddpm_fast.sampling-job/1"
MAX_SHARDS = 2 ** 20  # shard files in one work folder; the job lists them
MANIFEST = "manifest.json"


def state_dict_sha256(model: torch.nn.Module) -> str:
    """sha256 over the state dict's names, dtypes, shapes and bytes (_atomic.tensors_sha256): the
    same weights give the same checksum whichever file format or path they came from."""
    return tensors_sha256(model.state_dict())


def step_table_sha256(sampler: Sampler) -> str:
    """sha256 of the coefficient rows, timesteps and noise keys: every sampler setting the
    update depends on (schedule, method, variance, clip, η, spacing, prediction type)."""
    digest = hashlib.sha256()
    for tensor in (sampler.table.coefs, sampler.table.timesteps, sampler.table.noise_keys):
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class ShardPlan:
    """Shard k holds the global samples [k·shard_size, min((k + 1)·shard_size, num_samples))."""
    num_samples: int
    shard_size: int

    def __len__(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def bounds(self, k: int) -> tuple[int, int]:
        return k * self.shard_size, min((k + 1) * self.shard_size, self.num_samples)


def sample_to_file(sampler: Sampler, out: str | Path, num_samples: int, *, seed: int = 0, micro_batch: int,
                   shard_size: int | None = None, model_sha256: str | None = None, world: World | None = None,
                   resume: bool = False, overwrite: bool = False, progress: bool = False, nrow: int | None = None,
                   grid_width: int = GRID_WIDTH, labels: list[int] | None = None) -> Path:
    """Draw global samples 0 .. num_samples − 1 with `sampler` into `out` (*.npz, *.png grid or a
    folder/, as images.write_samples), through shards of `shard_size` samples (default: one
    micro-batch) drawn `micro_batch` at a time, spread over the ranks of `world` (default: this
    process alone). Every rank calls it; rank 0 writes the output and returns its path.

    resume=True continues the unfinished job of the same output, refusing one that was started
    with other settings; without it, an unfinished job's folder is an error (never silently
    thrown away; a folder holding no finished shard is removed). An existing output is replaced
    only with overwrite=True — except that the finished output of the same job is kept as it is
    (a no-op). One job at a time writes an output (Busy otherwise). model_sha256 defaults to the
    checksum of sampler.model's state dict. A grid output puts `nrow` samples a row and is at
    least `grid_width` pixels wide (images.grid_image). labels: the class of each global sample
    (num_samples of them) for a sampler that takes labels (Sampler.sample)."""
    world = world or World(device=sampler.device)
    shard_size = micro_batch if shard_size is None else shard_size
    for name, value in (("micro_batch", micro_batch), ("shard_size", shard_size), ("num_samples", num_samples)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if shard_size % micro_batch:
        raise ValueError(f"the shard size must be a multiple of the micro-batch {micro_batch}, got {shard_size}")
    check_samples(seed, 0, num_samples)  # the seed, and sample indices below 2^32
    if -(-num_samples // shard_size) > MAX_SHARDS:
        raise ValueError(f"{num_samples} samples in shards of {shard_size} make {-(-num_samples // shard_size):,} "
                         f"shards, more than {MAX_SHARDS:,} (a file each in the work folder): pass a larger "
                         f"--shard-size or --batch-size")
    if sampler.sample_shape[0] not in (1, 3):
        raise ValueError(f"images need 1 or 3 channels, the sampler draws {sampler.sample_shape}")
    output_kind(out)  # a bad --out fails now, not after hours of sampling
    if model_sha256 is None:
        if not isinstance(sampler.model, torch.nn.Module):
            raise ValueError("pass model_sha256= for a model that is not an nn.Module")
        model_sha256 = state_dict_sha256(sampler.model)
    settings = dict(sampler.config, backend=sampler.resolved_backend, model_sha256=model_sha256, seed=seed,
                    num_samples=num_samples, sample_shape=list(sampler.sample_shape), micro_batch=micro_batch,
                    shard_size=shard_size, noise_stream_version=NOISE_STREAM_VERSION,
                    step_table_sha256=step_table_sha256(sampler))
    if labels is not None:
        if len(labels) != num_samples:
            raise ValueError(f"labels must hold one class per sample ({num_samples}), got {len(labels)}")
        settings.update(labels_sha256=hashlib.sha256(np.asarray(labels, dtype=np.int64).tobytes()).hexdigest())
    if output_kind(out) == "grid":  # the picture's layout is part of the job; other outputs have none
        grid_layout(num_samples, *sampler.sample_shape[1:], nrow, width=grid_width)  # refused now, not after the work
        settings.update(grid_nrow=nrow, grid_width=grid_width)
    job = _Job(out, settings, world)
    return run_shards(job, resume, overwrite, progress, unit="step", units=lambda n: -(-n // micro_batch) *
                      len(sampler.table), desc=lambda n: f"{sampler.method} [{settings['backend']}], {n} of "
                      f"{num_samples} samples, {world.size} process{'es' * (world.size > 1)}",
                      work=lambda k, bar: job.draw(sampler, k, bar, labels))


def run_shards(job: "_Job", resume: bool, overwrite: bool, progress: bool, unit: str, units: Callable[[int], int],
               desc: Callable[[int], str], work: Callable[[int, tqdm], None]) -> Path:
    """Run a job's shards on every rank of its world: rank 0 prepares (or finds it finished: a
    no-op), the shards left are dealt round-robin, `work(k, bar)` makes shard k, rank 0 records
    each round in the manifest and finally merges. The bar counts `units(n)` for a shard of n
    items (this rank's share), described by `desc(items left)`. Returns the output's path."""
    world = job.world
    with job:
        todo = world.on_rank0(lambda: job.prepare(resume, overwrite))
        if todo is None:
            return Path(job.out)
        sizes = [stop - start for start, stop in map(job.plan.bounds, todo)]
        with tqdm(total=sum(map(units, sizes[world.rank::world.size])), disable=not progress or world.rank != 0,
                  unit=unit, desc=desc(sum(sizes))) as bar:
            for first in range(0, len(todo), world.size):
                round_ = todo[first:first + world.size]
                k = round_[world.rank] if world.rank < len(round_) else None
                if k is not None:
                    work(k, bar)
                finished = [k for k in world.all_gather(k) if k is not None]
                if world.rank == 0:
                    job.record(finished)
        return world.on_rank0(job.merge)


class _Job:
    """The work folder of one output: what rank 0 reads and writes, and the shards every rank writes.
    This one draws samples; another kind of job (cli/nll.py) sets FORMAT, KIND, SHARD_PREFIX and PAYLOAD
    and overrides draw, _check_payload and _write_output."""
    FORMAT = FORMAT
    KIND = "sampling job"  # as errors name it
    SHARD_PREFIX = "samples"  # shard files PREFIX-START-STOP.npz
    PAYLOAD = ("images",)     # a shard's arrays beside indices and settings_sha256

    def __init__(self, out: str | Path, settings: dict, world: World):
        self.out, self.settings, self.world = out, settings, world  # out as given: a trailing / means a folder
        self.plan = ShardPlan(settings["num_samples"], settings["shard_size"])
        self.folder = work_folder(out)
        self.digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
        self.done: set[int] = set()
        self.launches: list[dict] = []
        self.kind = output_kind(out)
        self.target = output_target(out)  # the output's file or folder, checked and written alike
        self.owned = False  # the work folder is this job's (created by it, or holding its format's manifest)
        self._lock = contextlib.ExitStack()

    def __enter__(self) -> "_Job":
        return self

    def __exit__(self, kind, error, trace) -> None:
        """Rank 0 releases the output's lock; a launch that fails leaves no work folder that
        holds no finished shard (nothing to resume, and it would block the next run)."""
        try:
            if error is not None and self.owned and self.folder.is_dir() \
                    and not any(self.folder.glob(f"{self.SHARD_PREFIX}-*.npz")):
                shutil.rmtree(self.folder)
        finally:
            self._lock.close()

    # -- rank 0 ------------------------------------------------------------------------------

    def prepare(self, resume: bool, overwrite: bool) -> list[int] | None:
        """Start or continue the job: the shards left to draw (None: finished before)."""
        launch = dict(world_size=self.world.size, threads=self.world.threads, device=self.world.device.type,
                      torch=torch.__version__, deterministic_algorithms=torch.are_deterministic_algorithms_enabled())
        self._lock.enter_context(exclusive(self.target, "the output"))
        if (self.folder.exists() or self.folder.is_symlink()) and not _is_work_folder(self.folder, self.FORMAT):
            raise ValueError(f"{self.folder} is in the way: it is not the work folder of a {self.KIND} (it holds no "
                             f"{self.FORMAT} manifest), and is never removed: move it, or choose another output")
        self.owned = True
        stale = stale_temporaries(self.target)  # left by writers killed before their rename
        if self.kind == "dir" and self.target.is_dir():
            stale += sorted(self.target.glob(".[0-9]*.png.*.tmp"))
        for path in stale:
            remove(path)
        if self.folder.is_dir() and not any(self.folder.glob(f"{self.SHARD_PREFIX}-*.npz")):
            print(f"note: removing {self.folder}: an earlier launch left it holding no finished shard", file=sys.stderr)
            shutil.rmtree(self.folder)
        if self.folder.is_dir():
            if not resume:
                raise ValueError(f"{self.folder} holds an unfinished job for {self.out}: pass --resume to continue it, "
                                 f"or delete the folder to start again")
            earlier = self._read_manifest(self.folder / MANIFEST).get("launches", [])
            if earlier and earlier[-1].get("threads") != launch["threads"]:
                print(f"note: the job ran with {earlier[-1].get('threads')} threads a process, this launch has "
                      f"{launch['threads']}: its samples agree to float tolerance, not bit for bit", file=sys.stderr)
            for path in self.folder.glob(".*.tmp"):  # left by a writer that was killed
                path.unlink()
            files = self._shard_files()
            for k, path in files.items():
                self._read_shard(k, path)
            self.done = set(files)
            self.launches = earlier + [launch]
            self._write_manifest()
        else:
            if self._finished_before(resume, overwrite):
                print(f"note: {self.out} already holds these {self.plan.num_samples} samples "
                      f"({finished_manifest(self.out)} records them): nothing to {'resume' if resume else 'do'}",
                      file=sys.stderr)
                return None
            # the folder appears with its manifest or not at all: a job killed here leaves nothing to resume
            self.folder.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{self.folder.name}.", suffix=".tmp", dir=self.folder.parent))
            try:
                staging.chmod(0o777 & ~_umask())
                self.launches = [launch]
                self._write_manifest(staging)
                staging.rename(self.folder)
            finally:
                remove(staging)  # gone already when the rename succeeded
        return [k for k in range(len(self.plan)) if k not in self.done]

    def record(self, finished: list[int]) -> None:
        self.done.update(finished)
        self._write_manifest()

    def merge(self) -> Path:
        """Check that the shards hold every index 0 .. N−1 exactly once — a file for each shard of
        the plan (no gaps), each holding exactly the indices its name gives (no duplicates, no
        strays) — then write the output from them in index order, keep the manifest beside it
        and remove the work folder."""
        files = self._shard_files()
        missing = [self.plan.bounds(k) for k in range(len(self.plan)) if k not in files]
        if missing:
            raise ValueError(f"{self.folder}: no shard holds the samples {_ranges_text(missing)}; "
                             f"run again with --resume to draw them")
        for k, path in files.items():  # all checked before a byte of the output is written
            self._read_shard(k, path)
        path = self._write_output(files)
        write_json(finished_manifest(self.out), dict(self._manifest(complete=True), output_sha256=self._output_sha256()))
        for shard in files.values():
            shard.unlink()
        (self.folder / MANIFEST).unlink()
        self.folder.rmdir()
        return path

    def _write_output(self, files: dict[int, Path]) -> Path:
        shape = (self.plan.num_samples, *self.settings["sample_shape"][1:], self.settings["sample_shape"][0])
        chunks = ((self.plan.bounds(k)[0], self._read_shard(k, path, payload=True)) for k, path in sorted(files.items()))
        return write_samples(chunks, self.target, shape, self.settings.get("grid_nrow"),
                             self.settings.get("grid_width", GRID_WIDTH), self.kind)

    def _finished_before(self, resume: bool, overwrite: bool) -> bool:
        """Whether the output holds this very job, finished (its manifest records these settings
        and the output's sha256); otherwise, without overwrite, refuse to replace what is there."""
        path, out = finished_manifest(self.out), self.target
        present = any(out.iterdir()) if self.kind == "dir" and out.is_dir() else out.exists() or out.is_symlink()
        manifest = _job_manifest(path, self.FORMAT)
        if not present:
            if (path.exists() or path.is_symlink()) and manifest is None and not overwrite:
                raise ValueError(f"{path} exists and is not a {self.FORMAT} manifest: pass --overwrite to replace it")
            return False
        if manifest is None or not manifest.get("complete") \
                or manifest.get("output_sha256") != self._output_sha256():
            if overwrite:
                return False
            raise ValueError(f"{self.out} exists and is not the finished output of a job ({path} does not record its "
                             f"sha256): pass --overwrite to replace it")
        changes = self._changes(manifest)
        if not changes:
            return True
        if resume or not overwrite:
            raise ValueError(f"{'--resume refused: ' if resume else ''}{self.out} holds a finished job with other "
                             f"settings (then → now): {changes}; pass --overwrite to replace it")
        return False

    def _output_sha256(self) -> str | None:
        """sha256 of the output: of its file, or for a folder of its sample files' names and
        sha256s in index order (None when one is missing)."""
        out = self.target
        if self.kind != "dir":
            return file_sha256(out) if out.is_file() else None
        digest = hashlib.sha256()
        for index in range(self.plan.num_samples):
            path = sample_file(out, index)
            if not path.is_file():
                return None
            digest.update(f"{path.name}|{file_sha256(path)}\n".encode())
        return None if sample_files(out, self.plan.num_samples) else digest.hexdigest()

    def _changes(self, manifest: dict) -> str:
        saved = manifest.get("settings", {})
        differing = sorted(k for k in saved.keys() | self.settings.keys() if saved.get(k) != self.settings.get(k))
        return "; ".join(f"{k} {saved.get(k)!r} → {self.settings.get(k)!r}" for k in differing)

    def _read_manifest(self, path: Path) -> dict:
        try:
            manifest = json.loads(read_regular(path))
        except (OSError, ValueError) as error:
            raise ValueError(f"--resume: cannot read the manifest {path}: {error}") from error
        if not isinstance(manifest, dict) or manifest.get("format") != self.FORMAT:
            raise ValueError(f"--resume: {path} is not a {self.FORMAT} manifest")
        changes = self._changes(manifest)
        if changes:
            raise ValueError(f"--resume refused: {path} records a job with other settings (then → now): {changes}; "
                             f"to start again with the new settings, delete {self.folder}")
        return manifest

    def _manifest(self, complete: bool = False) -> dict:
        done = sorted(self.plan.bounds(k) for k in self.done)
        ranges: list[list[int]] = []
        for start, stop in done:  # adjacent shards joined into one range
            if ranges and ranges[-1][1] == start:
                ranges[-1][1] = stop
            else:
                ranges.append([start, stop])
        return dict(format=self.FORMAT, settings=self.settings, settings_sha256=self.digest, complete=complete,
                    completed=[[0, self.plan.num_samples]] if complete else ranges, launches=self.launches)

    def _write_manifest(self, folder: Path | None = None) -> None:
        write_json((folder or self.folder) / MANIFEST, self._manifest())

    # -- every rank --------------------------------------------------------------------------

    def shard_path(self, k: int) -> Path:
        start, stop = self.plan.bounds(k)
        return self.folder / f"{self.SHARD_PREFIX}-{start:010d}-{stop:010d}.npz"

    def draw(self, sampler: Sampler, k: int, bar, labels: list[int] | None) -> None:
        start, stop = self.plan.bounds(k)
        x0 = sampler.sample(stop - start, seed=self.settings["seed"], sample_offset=start,
                            batch_size=self.settings["micro_batch"], progress=bar,
                            labels=None if labels is None else labels[start:stop])
        write_npz(self.shard_path(k), {"images": to_uint8(x0), "indices": np.arange(start, stop, dtype=np.int64),
                                       "settings_sha256": np.array(self.digest)})

    def _shard_files(self) -> dict[int, Path]:
        expected = {self.shard_path(k).name: k for k in range(len(self.plan))}
        found = {path.name: path for path in self.folder.glob(f"{self.SHARD_PREFIX}-*.npz")}
        unexpected = sorted(found.keys() - expected.keys())
        if unexpected:
            raise ValueError(f"{self.folder} holds shards of no shard of this job's plan: {unexpected[:4]}")
        return {expected[name]: path for name, path in found.items()}

    def _read_shard(self, k: int, path: Path, payload: bool = False):
        """Shard k's indices (or, with payload, its PAYLOAD checked by _check_payload), after
        checking it belongs to this job."""
        start, stop = self.plan.bounds(k)
        try:
            with open_regular(path) as file, np.load(file) as f:  # allow_pickle=False: a shard is data, never code
                tag, indices = str(f["settings_sha256"]), f["indices"]
                arrays = {name: f[name] for name in self.PAYLOAD} if payload else None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:  # truncated, not npz
            raise ValueError(f"shard {path} is unreadable ({error}): delete it and resume to draw it again") from error
        if tag != self.digest:
            raise ValueError(f"shard {path} was drawn with other settings than {self.folder / MANIFEST}")
        if indices.shape != (stop - start,) or not (indices == np.arange(start, stop)).all():
            raise ValueError(f"shard {path} must hold the samples {start} .. {stop - 1}, holds indices "
                             f"{indices[:8].tolist()}{' ...' if indices.size > 8 else ''}")
        return indices if arrays is None else self._check_payload(path, stop - start, arrays)

    def _check_payload(self, path: Path, n: int, arrays: dict[str, np.ndarray]):
        pictures = arrays["images"]
        c, h, w = self.settings["sample_shape"]
        if pictures.dtype != np.uint8 or pictures.shape != (n, h, w, c):
            raise ValueError(f"shard {path} must hold uint8 images {(n, h, w, c)}, "
                             f"holds {pictures.dtype} {pictures.shape}")
        return pictures


def _job_manifest(path: Path, format_: str) -> dict | None:
    """The manifest at `path` when it is one of a job's of this format, else None; a FIFO or
    other non-file there is refused by name (NotARegularFile)."""
    try:
        manifest = json.loads(read_regular(path))
    except NotARegularFile:
        raise
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == format_ else None


def _is_work_folder(folder: Path, format_: str) -> bool:
    """Whether `folder` is a job's work folder (a real folder holding a manifest of the format):
    only such a folder is ever removed or resumed, never a user's own that happens to be named
    OUT.parts."""
    return folder.is_dir() and not folder.is_symlink() and _job_manifest(folder / MANIFEST, format_) is not None


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _ranges_text(ranges: list[tuple[int, int]]) -> str:
    shown = ", ".join(f"[{a}, {b})" for a, b in ranges[:4])
    return shown + (f" and {len(ranges) - 4} more ranges" if len(ranges) > 4 else "")
