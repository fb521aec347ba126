"""CPU thread settings that hold up on a busy machine and stay fast on an idle one.

PyTorch's CPU kernels run on an OpenMP pool (libgomp). By default its idle threads spin at every
barrier for up to 300,000 iterations before they sleep; when other work shares the cores, a
spinning thread holds a core the thread it waits for needs, and a denoiser call can take 5-20x
longer than on one thread (`benchmarks/threads.py`). Sleeping at once (``OMP_WAIT_POLICY=PASSIVE``,
what the CLI set until 2026-12-06) fixes that but makes every op wake its threads again: on an
idle 2-core Xeon the integer runtime's digits call (more, smaller ops than the FP model's) took
1.5x as long as with spinning. The CLI now lets waiting threads spin briefly, then sleep
(``GOMP_SPINCOUNT=10000``): idle it is within 10 % of libgomp's default, loaded it stays far from
the default's collapse (`benchmarks/threads.py`, figures in docs/chain.md).

libgomp reads these variables once, when torch is first imported, so the CLI sets them (unless the
user set either) before importing torch; `configure_threads` then applies ``--threads``.
"""

from __future__ import annotations

import os

__all__ = ["SPIN_COUNT", "configure_threads", "limit_spin_wait"]

SPIN_COUNT = "10000"


def limit_spin_wait() -> None:
    """Make OpenMP's waiting threads spin briefly, then sleep (no effect once torch is imported, nor
    when OMP_WAIT_POLICY or GOMP_SPINCOUNT is already set)."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)


def configure_threads(threads: int | None) -> int:
    """Use `threads` intra-op threads (None: torch's default, one per core or $OMP_NUM_THREADS);
    returns the number in use."""
    import torch

    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()
