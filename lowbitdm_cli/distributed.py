"""Several processes on one job under `torchrun`: rank, world size, barrier, broadcast.

`torchrun --nproc_per_node N -m lowbitdm_cli sample ...` starts N copies of the command with
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set; `process_group` joins them
(gloo on CPU, nccl when the work runs on CUDA) and leaves again. Launched any other way, it
is a group of one and every operation is a no-op, so the same code serves both.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from lowbitdm_cli import errors
from lowbitdm_cli.errors import LowbitError

__all__ = ["ProcessGroup", "launched_world_size", "process_group", "rank_device"]

T = TypeVar("T")
# Ranks wait at a barrier while rank 0 assembles 50k samples (tens of GB read and written): be generous.
_TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place in the job; with world_size 1 every operation is local."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank (any picklable object)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def split(self, items: list[T]) -> list[T]:
        """This rank's share of `items`: every world_size-th one, starting at its rank."""
        return items[self.rank::self.world_size]

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 only and return its (picklable) result on every rank.

        An expected error (`LowbitError`) on rank 0 is raised on every rank, with the same
        class and message, instead of leaving the other ranks waiting.
        """
        result: Any = None
        failure: tuple[str, str] | None = None
        if self.is_main:
            try:
                result = fn()
            except LowbitError as e:
                if self.world_size == 1:
                    raise
                failure = (type(e).__name__, str(e))
                self.broadcast((None, failure))
                raise
        result, failure = self.broadcast((result, failure))
        if failure is not None:
            cls = getattr(errors, failure[0], LowbitError)
            raise (cls if isinstance(cls, type) and issubclass(cls, LowbitError) else LowbitError)(failure[1])
        return result


def launched_world_size() -> int:
    """How many processes torchrun started for this job (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_device(device: str, group: ProcessGroup) -> str:
    """The device this rank works on: ``cuda`` means the rank's own GPU (cuda:LOCAL_RANK)."""
    return f"cuda:{group.local_rank}" if device == "cuda" and group.world_size > 1 else device


@contextmanager
def process_group(device: str = "cpu") -> Iterator[ProcessGroup]:
    """Join torchrun's process group for the duration of the block (nccl for CUDA, else gloo).

    A group that this block created is destroyed at its end; one that already existed (a
    caller that set up torch.distributed itself) is used and left alone.
    """
    world = launched_world_size()
    if world <= 1:
        yield ProcessGroup()
        return
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    created = False
    if not dist.is_initialized():
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=_TIMEOUT)
        created = True
    try:
        yield ProcessGroup(rank=rank, world_size=world, local_rank=local_rank)
    finally:
        if created:
            dist.destroy_process_group()
