"""Several processes on one job under `torchrun`: rank, world size, barrier, broadcast, reductions.

`torchrun --nproc_per_node N -m lowbitdm_cli sample ...` starts N copies of the command with
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set; `process_group` joins them
(gloo on CPU, nccl when the work runs on CUDA) and leaves again. Launched any other way, it
is a group of one and every operation is a no-op, so the same code serves both.

`calibrate` and `finetune` are data parallel on top of it: every rank holds the whole model and
works on its share of each global batch. `finetune` (and block reconstruction with
`calibrate.recon_micro_batch`) sums gradients in a fixed order (`ordered_sum`): the batch is cut
into micro-batches by global index, and every rank adds all micro-batches' flat gradients
(`pack_grads`) one by one in index order, as one process does, so the result has the same bits
for any number of processes. Reconstruction without micro-batches sums the ranks' gradients by
one all-reduce of a flat buffer per optimizer step (`sync_grads`): DDP's gradient
synchronisation without its module wrapper (the models are called through `DiffusionModel` with
hooks, and the trained tensors are small: LoRA factors, step sizes, AdaRound variables).
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

__all__ = ["ProcessGroup", "launched_world_size", "pack_grads", "process_group", "rank_device", "unpack_grads"]

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

    def all_reduce_sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sum `tensors` across ranks in place, in one flat all-reduce (they share a device and dtype)."""
        if self.world_size == 1 or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def sync_grads(self, params: list[torch.Tensor], extra: list[torch.Tensor] = ()) -> None:
        """Sum the gradients of `params` (and the tensors `extra`) over ranks, in one all-reduce.

        A parameter that got no gradient on some rank counts as zero there; one that got none on
        any rank keeps ``grad = None``, as in one process (the optimizer then skips it)."""
        if self.world_size == 1:
            return
        ref = params[0] if params else extra[0]
        used = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=ref.device)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.all_reduce_sum_([*(p.grad for p in params), *extra, used])
        for p, u in zip(params, used.tolist()):
            if u == 0:
                p.grad = None

    def ordered_sum(self, parts: list[torch.Tensor], total: int) -> torch.Tensor:
        """The sum of `total` flat vectors of one length held across the ranks, each rank holding its
        `shard(total)` of them (`parts`, in index order), added one by one in global index order.

        Every rank gathers all of them (an all-gather of ⌈total / world_size⌉ vectors per rank) and
        does the same additions: float addition is correctly rounded, so with the order fixed the
        sum has the same bits for any process count, which an all-reduce (its order depends on the
        ranks and the backend) does not promise."""
        lo, hi = self.shard(total)
        if len(parts) != hi - lo or not parts:
            raise ValueError(f"rank {self.rank} holds {len(parts)} of {total} vectors, its share is {hi - lo} "
                             f"(each of the {self.world_size} processes needs one at least)")
        seq = parts
        if self.world_size > 1:
            per = -(-total // self.world_size)
            buf = parts[0].new_zeros(per, parts[0].numel())
            for i, p in enumerate(parts):
                buf[i].copy_(p)
            out = [torch.empty_like(buf) for _ in range(self.world_size)]
            dist.all_gather(out, buf)
            counts = [b - a for a, b in (ProcessGroup(r, self.world_size).shard(total) for r in range(self.world_size))]
            seq = [out[r][i] for r in range(self.world_size) for i in range(counts[r])]
        acc = seq[0].clone()
        for p in seq[1:]:
            acc.add_(p)
        return acc

    def all_gather(self, obj: T) -> list[T]:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def shard(self, n: int) -> tuple[int, int]:
        """This rank's contiguous share [lo, hi) of n rows (the first n % world_size ranks get one more)."""
        base, extra = divmod(n, self.world_size)
        lo = self.rank * base + min(self.rank, extra)
        return lo, lo + base + (1 if self.rank < extra else 0)

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


def pack_grads(params: list[torch.Tensor], extra: list[torch.Tensor] = ()) -> torch.Tensor:
    """One flat vector: the gradients of `params` (zeros where there is none), the tensors `extra`,
    then one flag per parameter (1.0 where it got a gradient), for `ordered_sum` and `unpack_grads`."""
    ref = params[0] if params else extra[0]
    return torch.cat([*((p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params),
                      *(t.reshape(-1).to(ref.dtype) for t in extra),
                      torch.tensor([float(p.grad is not None) for p in params], dtype=ref.dtype, device=ref.device)])


def unpack_grads(params: list[torch.Tensor], flat: torch.Tensor, n_extra: int) -> torch.Tensor:
    """Set the gradients of `params` from a (summed) `pack_grads` vector and return its `n_extra`
    extra values. A parameter no part gave a gradient keeps ``grad = None`` (the optimizer skips it)."""
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    extra = flat[offset:offset + n_extra]
    for p, used in zip(params, flat[offset + n_extra:].tolist()):
        if used == 0:
            p.grad = None
    return extra


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
