"""How a CPU rank's C heap treats the large blocks a training step frees.

torch's CPU allocator is the C library's ``malloc``, with no cache of its own. glibc serves every
block above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and unmaps it on ``free``,
and it trims the heap top back to the OS beyond a threshold. An AlexNet step allocates and frees
its activations, their gradients and the LRN's temporaries, many of them 10-200 MB, so every
step maps them anew and the kernel page-faults and zeroes each 4 KiB page on first touch: half a
million faults per step at the paper's size, about a fifth of the step.

Keeping freed memory in the heap (no mmap for large blocks, no trimming) makes the second step
reuse the first one's pages. This is what the allocators the PyTorch CPU tuning guide recommends
(jemalloc, tcmalloc) do; glibc does it with two ``mallopt`` calls and nothing to install. The
price is that resident memory stays at the step's high-water mark between steps instead of
dropping after each one; the training loop hands the pages back between its phases with
:func:`release_freed_memory`.

Only glibc has ``mallopt``: elsewhere (macOS, musl) :func:`keep_freed_memory` returns False and
:func:`release_freed_memory` does nothing.
"""

from __future__ import annotations

import ctypes
import platform

# mallopt's parameter numbers (<malloc.h>)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4


def glibc() -> ctypes.CDLL | None:
    """The C library, where it is glibc (the one with ``mallopt``); None elsewhere."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Freed blocks stay in this process's heap for the next allocation (no mmap for large
    blocks, no trimming).

    Applies to allocations made from now on, in this process and in processes it forks later
    (the data loader's workers). Returns whether the C library took the settings: False where it
    is not glibc.
    """
    libc = glibc()
    if libc is None:
        return False
    # -1 disables trimming altogether (mallopt(3)); it also stops glibc from moving the
    # thresholds itself.
    settings = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)


def release_freed_memory() -> None:
    """Hand the heap's free memory back to the OS now (``malloc_trim``, which ignores the trim
    threshold; well under a millisecond). Tensors held only by reference cycles are not freed
    yet: call ``gc.collect()`` first where that matters (it takes 150 ms with torch loaded, too
    much for every epoch of a short run)."""
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)
