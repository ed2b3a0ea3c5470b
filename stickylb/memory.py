"""glibc malloc settings for a process that streams large bodies.

By default glibc serves allocations of 128 KiB and more with their own ``mmap`` (raising that
threshold as it goes) and gives free memory at the top of the heap back to the kernel once
twice that much is free. Every socket read of a large body is a new ``bytes`` of up to
256 KiB, so under load the process kept returning memory and faulting it in again: with 1 MiB
answers on uvloop, ~120,000 page faults a second and a third or more CPU per MiB relayed than
with the settings below (``perf stat``, ``benchmarks/``). Allocations under 1 MiB now come
from the heap and up to 8 MiB of free heap is kept for reuse: resident memory is higher by at
most that, and it does not climb, because what waits per connection is bounded
(``wire.client.WRITE_HIGH_WATER``). An operator's own ``MALLOC_*`` settings win.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20
TRIM_THRESHOLD = 8 << 20
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
