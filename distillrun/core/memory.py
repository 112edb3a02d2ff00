"""Freed CPU memory kept for reuse, so large activations do not page-fault on every batch.

glibc's malloc serves a block above its mmap threshold (32 MB at most) with a fresh mmap and
unmaps it on free. A CNN scoring 1,024 MNIST images makes activations of about 100 MB a layer,
so every batch faulted its memory in anew: 7.5 million page faults, half the wall time of
a teacher's pass over the training split. Served from the heap and kept there once freed,
the blocks are reused after a few passes (the heap settles a few blocks larger than its peak)
and the same pass takes half the time, computing the same bits.
"""

from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's <malloc.h>
KEEP_FREED_BYTES = 1 << 30  # freed memory beyond this at the heap's top goes back to the OS


def keep_freed_memory() -> bool:
    """Have glibc serve every block from the heap and keep up to 1 GB of it once freed (no
    effect, and False, on other C libraries). Numbers are unchanged: only where tensors live."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES)
        )
    except (OSError, AttributeError):
        return False
