"""Process settings for fast CPU inference: keep freed memory in the heap instead of returning it to the OS.

glibc's malloc serves large blocks (above a threshold that it raises up to 32 MiB) with fresh ``mmap``
pages and gives heap memory back to the system as soon as enough is free at its top. A CPU forward pass
allocates and frees activations of several MB per layer, so the next pass touches new pages and pays a
page fault for each 4 KiB of them: about 22 000 faults and 7-10 % of the time of a BiFormer-T evaluation
at batch 8 on 2 cores, more for the official gather, whose k-fold copies are fresh on every call. The
same advice as PyTorch's CPU launcher (``torch.backends.xeon.run_cpu``, which preloads jemalloc or
tcmalloc for this reason), done in-process with ``mallopt``.

:func:`retain_freed_memory` is called by the entry points (``bilevel`` CLI, app, benchmarks), never on
import: the price is that the process keeps its peak heap instead of shrinking after it.
"""
from __future__ import annotations

import ctypes
import functools
import platform

__all__ = ["retain_freed_memory", "RETAINED"]

#: blocks up to this size come from the heap (glibc's own ceiling is 32 MiB, which 224 px activations reach)
MMAP_THRESHOLD_BYTES = 256 << 20
#: free memory at the top of the heap kept up to this size (mallopt takes an int: the largest one)
TRIM_THRESHOLD_BYTES = (1 << 31) - 1
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
RETAINED = (f"glibc keeps freed memory (blocks up to {MMAP_THRESHOLD_BYTES >> 20} MiB from the heap, "
            f"up to {(TRIM_THRESHOLD_BYTES + 1) >> 30} GiB of free heap kept)")


@functools.lru_cache(maxsize=1)
def retain_freed_memory() -> str:
    """Make glibc's malloc keep freed memory for reuse (once per process). Returns what was done, in words
    (benchmarks print it): :data:`RETAINED`, or why nothing was (another C library, no ``mallopt``, a refusal)."""
    library, _ = platform.libc_ver()
    if library != "glibc":
        return f"left as it is: the C library is {library + ', not glibc' if library else 'not glibc'}"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "left as it is: this process has no mallopt"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if not (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)):
        return "left as it is: glibc refused the thresholds"
    return RETAINED
