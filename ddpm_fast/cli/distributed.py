"""The processes of a sampling job, on PyTorch's own distributed engine.

Under torchrun (WORLD_SIZE > 1 in the environment) every process joins one torch.distributed
group — NCCL when it samples on a GPU (cuda:LOCAL_RANK), gloo on the CPU; otherwise the job is
a world of one and nothing is initialised, so a plain `ddpm-fast sample` needs no rendezvous.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist


class ReportedOnRankZero(ValueError):
    """An error rank 0 met and reported; the other ranks stop with it without repeating it."""


@dataclass
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # we initialised the process group, so we destroy it

    @property
    def threads(self) -> int:
        return torch.get_num_threads()

    def all_gather(self, value: Any) -> list:
        """Every rank's `value` (a small picklable object), in rank order, on every rank."""
        if self.size == 1:
            return [value]
        values = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def on_rank0(self, fn: Callable[[], Any]) -> Any:
        """fn() run by rank 0 alone, its result handed to every rank. When it fails with a
        ValueError or an OSError, every rank raises: the others with ReportedOnRankZero, rather
        than waiting for rank 0 at the next collective until the timeout."""
        if self.size == 1:
            return fn()
        payload: list = [None]
        error = None
        if self.rank == 0:
            try:
                payload[0] = (True, fn())
            except (ValueError, OSError) as e:
                error, payload[0] = e, (False, str(e))
        dist.broadcast_object_list(payload, src=0)
        if error is not None:
            raise error
        ok, value = payload[0]
        if not ok:
            raise ReportedOnRankZero(value)
        return value

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False

    def __enter__(self) -> "World":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def world_from_env(device: str | torch.device) -> World:
    """This process's place in the job torchrun started (RANK, WORLD_SIZE, LOCAL_RANK and the
    rendezvous variables), or a world of one. `device` "cuda" becomes cuda:LOCAL_RANK."""
    device = torch.device(device)
    size = _environment_int("WORLD_SIZE", "1")
    if size <= 1:
        return World(device=device)
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={size} but this torch build has no torch.distributed")
    rank, local_rank = _environment_int("RANK", None, size), _environment_int("LOCAL_RANK", "0")
    if device.type == "cuda":
        if device.index is not None:
            raise ValueError(f"under torchrun pass --device cuda (rank {rank} takes cuda:LOCAL_RANK), got {device}")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)  # NCCL's object collectives run on the current device
    if dist.is_initialized():
        return World(rank, size, device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), device, owns_group=True)


def _environment_int(name: str, default: str | None, size: int | None = None) -> int:
    """An integer torchrun sets (in [0, size) when size is given), or a ValueError naming it."""
    text = os.environ.get(name, default)
    if text is None:
        raise ValueError(f"WORLD_SIZE={size} asks for a job of {size} processes, but {name} is not set: start it with "
                         f"torchrun, which sets RANK, LOCAL_RANK and the rendezvous variables, or unset WORLD_SIZE")
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0 or (size is not None and value >= size):
        raise ValueError(f"{name} must be an integer >= 0{f' below WORLD_SIZE={size}' if size else ''}, got {text!r}")
    return value
