"""glibc malloc settings for a process that streams large bodies.

By default glibc serves allocations of 128 KiB and more with their own ``mmap`` (adjusting the
threshold as it goes) and returns free memory at the top of the heap to the kernel as soon as
128 KiB of it is free. A proxy reads bodies in chunks of up to 256 KiB, so under load it kept
mapping, faulting in and unmapping the same memory: 1 MiB answers ran at ~900 MiB/s on uvloop
instead of ~1,600 (``benchmarks/``, same run). With chunks of up to 1 MiB served from the heap
and up to 16 MiB of free heap kept, the process reuses its memory instead; resident memory is
higher by at most that and does not grow. An operator's own ``MALLOC_*`` settings win.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20
TRIM_THRESHOLD = 16 << 20
_OPERATOR_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def tune_malloc() -> bool:
    """Apply the settings above; False when this is not glibc or the operator set their own."""
    if not sys.platform.startswith("linux") or any(
        name in os.environ for name in _OPERATOR_SETTINGS
    ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: nothing to tune
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
