"""The C library's default heap, for the ``malloc_default`` variant: what a CPU rank does
without :func:`~alexnet_mp.host_memory.keep_freed_memory` (large blocks mapped and unmapped,
the top trimmed), switched in for an arm and back after it."""

from __future__ import annotations

from alexnet_mp.host_memory import M_MMAP_MAX, M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, glibc

# glibc's defaults as a training process meets them after its first large free: the dynamic
# mmap threshold has risen to its ceiling and the trim threshold to twice that.
DEFAULT_MMAP_MAX = 65536
DEFAULT_MMAP_THRESHOLD = 32 * 1024 * 1024
DEFAULT_TRIM_THRESHOLD = 2 * DEFAULT_MMAP_THRESHOLD


def default_heap() -> bool:
    """glibc's default behaviour as it stands after a training step, for allocations from now
    on; returns whether the C library took the settings (False where it is not glibc)."""
    libc = glibc()
    if libc is None:
        return False
    settings = ((M_MMAP_THRESHOLD, DEFAULT_MMAP_THRESHOLD),
                (M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD), (M_MMAP_MAX, DEFAULT_MMAP_MAX))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)
