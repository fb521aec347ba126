"""Keep freed memory for reuse: glibc's malloc settings for a process that allocates large tensors.

PyTorch's CPU tensors come from the C library's malloc, and glibc serves every block above its
mmap threshold (at most 32 MiB by default) with a fresh ``mmap`` and returns it with ``munmap`` on
free. A denoiser forward at batch 64 allocates and frees such blocks at every layer (a
[64, 128, 32, 32] float32 activation is 32 MiB), so each one costs page faults on first touch:
on a 2-core Xeon (Sapphire Rapids class) an int8 conv with a float32 output of that shape took
2.6x as long as with its block reused (`benchmarks/conv_kernels.py`; the integer runtime's
outputs, float32 before the cast to the compute dtype, are twice the bf16 model's, so they cross
the threshold where the bf16 model's do not). The usual remedy in
PyTorch CPU deployments is another allocator (jemalloc / tcmalloc through ``LD_PRELOAD``); this
module gets the same effect from glibc itself with two `mallopt` calls: blocks up to 1 GiB come
from the heap (``M_MMAP_THRESHOLD``), and freed heap memory stays with the process
(``M_TRIM_THRESHOLD``) for the next allocation instead of going back to the OS.

The cost: the process keeps its peak heap until it exits (a CLI process that samples and exits), or
until `release_freed_memory` hands the free part back (each stage does at its start, so the peak
memory its manifest records is its own, not an earlier stage's in the same ``lowbitdm run``).
The CLI applies it at start-up and the benchmarks apply it to every configuration they time,
FP ones included; ``LOWBITDM_MALLOC=default`` leaves glibc's defaults. No effect on other C
libraries (musl, macOS, Windows): `keep_freed_memory` then returns False.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

__all__ = ["ENV", "keep_freed_memory", "release_freed_memory"]

ENV = "LOWBITDM_MALLOC"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
_MMAP_THRESHOLD = 1 << 30
_TRIM_THRESHOLD = (1 << 31) - 1  # an int parameter: the largest it takes


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # glibc only: musl's mallopt ignores its arguments  # noqa: B018
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


def release_freed_memory() -> None:
    """Return the heap's free memory to the OS now (glibc's ``malloc_trim``; nothing elsewhere)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's malloc to serve blocks up to 1 GiB from the heap and keep freed memory (once per
    process); True where it took effect, False with ``$LOWBITDM_MALLOC=default`` or without glibc."""
    setting = os.environ.get(ENV, "keep")
    if setting not in ("keep", "default"):
        raise ValueError(f"${ENV} must be keep or default, got {setting!r}")
    libc = None if setting == "default" else _glibc()
    if libc is None:
        return False
    return libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
