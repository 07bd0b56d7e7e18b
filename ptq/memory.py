"""Keep a long block-by-block run's resident memory at one block's worth.

glibc raises its mmap threshold after large frees (up to 32 MiB), after which tensors
of a few MiB come from the heap and their pages stay resident when freed: a
block-by-block run's RSS would then grow with every block. Fixing the threshold (what
``MALLOC_MMAP_THRESHOLD_`` does) returns freed block-sized tensors to the OS, and
:func:`release_freed` collects reference cycles (modules with hooks) and trims the heap
after each block. Both are no-ops where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import gc

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 128 * 1024


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def return_freed_memory_to_os() -> None:
    """Pin glibc's mmap threshold so that large freed tensors go back to the OS."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def release_freed() -> None:
    """Collect garbage cycles and give the heap's free pages back to the OS."""
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
