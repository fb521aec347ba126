"""CPU thread settings that hold up on a busy machine.

PyTorch's CPU kernels run on an OpenMP pool (libgomp). By default its idle threads spin at every
barrier before they sleep; when other work shares the cores, a spinning thread holds a core the
thread it waits for needs, and a denoiser call can take 10-20x longer than on one thread
(`benchmarks/threads.py`). With ``OMP_WAIT_POLICY=PASSIVE`` waiting threads sleep at once, and
two threads on two cores stay faster than one, idle or loaded.

libgomp reads the variable once, when torch is first imported, so the CLI sets it (unless the
user set it) before importing torch; `configure_threads` then applies ``--threads``.
"""

from __future__ import annotations

import os

__all__ = ["WAIT_POLICY", "configure_threads", "prefer_passive_wait"]

WAIT_POLICY = "PASSIVE"


def prefer_passive_wait() -> None:
    """Make OpenMP's waiting threads sleep instead of spin (no effect once torch is imported,
    nor when OMP_WAIT_POLICY is already set)."""
    os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)


def configure_threads(threads: int | None) -> int:
    """Use `threads` intra-op threads (None: torch's default, one per core or $OMP_NUM_THREADS);
    returns the number in use."""
    import torch

    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()
