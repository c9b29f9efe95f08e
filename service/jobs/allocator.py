"""Keep freed memory in the process: glibc's allocator tuned for the attack loop.

An attack iteration allocates and frees the same few hundred tensors, several of them megabytes
large. glibc serves blocks above its mmap threshold with fresh mmap()s and returns them on free,
so every iteration page-faults tens of megabytes back in and the kernel zeroes them: 4,800 to
29,000 minor faults per iteration of a CPU attack, and 6 to 24 % of its time
(`python -m bench.allocator`, bench/results/allocator-cpu.json). Raising the mmap threshold to
its maximum and the trim threshold far above it keeps those blocks in the heap for reuse, as the
allocators PyTorch's CPU tuning guides recommend (jemalloc, tcmalloc) do by design. The cost
is that the process keeps its peak heap rather than handing it back between jobs, which a worker
that runs one attack after another reuses anyway (peak RSS was unchanged in that benchmark).

Applied once per process from the job runner, on Linux with glibc; `GRADLEAK_MALLOC_TUNING=false`
turns it off. A no-op elsewhere (macOS, musl): the attacks are the same, only slower on a CPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)  # glibc's upper bound, 32 MiB
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 64 << 20

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Tune glibc's malloc once; True when the tuning is in effect in this process."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False  # not glibc (musl has neither)
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = all(
        mallopt(param, value) == 1
        for param, value in (
            (M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX),
            (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (M_TOP_PAD, TOP_PAD),
        )
    )
    if not ok:
        log.warning("glibc refused the allocator tuning; CPU attacks run without it")
    return ok
