"""Keep freed memory in the process for reuse: large tensors without page-fault storms.

glibc serves every allocation above 32 MB (the largest mmap threshold it allows) with a
fresh ``mmap`` and returns it with ``munmap`` when freed. A training step allocates the
same large tensors every step (the [J, B, m] codes and their gradients: 200 MB each for
J = 8, B = 4096, m = 3072 in bf16), so every step the kernel maps and zero-fills them
again, page by page, and a batched bagging step loses much of its speed per member (the
README's performance section, "Measurements behind design choices", has the numbers).

:func:`keep_freed_memory` tells glibc to serve large blocks from the heap
(``M_MMAP_MAX = 0``) and not to give freed heap back (``M_TRIM_THRESHOLD`` = 2 GiB - 1, the int maximum), so
the second step reuses the first step's pages. The process keeps its peak memory until
it exits, which is what a training process wants anyway. It is a process-wide setting,
applied once; on anything but glibc it does nothing. The extraction stage applies it too
(shard-sized arrays and Parquet buffers per shard).

On a CUDA device it is harmless: device memory comes from torch's CUDA caching allocator
and pinned host buffers from CUDA's host allocator, neither of which goes through glibc's
malloc, so the setting only affects the host-side arrays (shards, shuffle buffer), which
it keeps from being re-faulted as on the CPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the setting above once per process; returns whether it is in effect."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied
