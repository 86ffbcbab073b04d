"""Keep glibc's malloc from handing a DP step's freed memory back to the system between steps (CPU only).

On CPU, PyTorch allocates tensors with the C library's ``malloc``. glibc's serves blocks above a
threshold (128 KB at start, raised on the fly up to 32 MB) with ``mmap`` and gives them back on ``free``,
and trims the top of its heap once more than twice that threshold is free there. A book-keeping DP step
holds every clipped layer's activations and output gradients until the clip factors are known, so its
peak is higher than a non-private step's and it ends by freeing hundreds of MB at once: glibc returns
them, and the next step faults every page in again. In DeiT-tiny's DP step (batch 64, one thread) that
was ~50,000-100,000 minor page faults a step and a GELU backward 4× slower than without DP; a
non-private step settles at none.

:func:`keep_freed_memory` sets the two thresholds the way ``MALLOC_MMAP_THRESHOLD_=33554432
MALLOC_TRIM_THRESHOLD_=1073741824`` would have at process start: blocks up to 32 MB come from the heap,
and up to 1 GB of freed heap stays mapped for the next step. It changes the whole process, so it is done
once, only under glibc, never when the user has set a ``MALLOC_*`` variable or ``GLIBC_TUNABLES`` (their
choice stands) and never with another ``malloc`` preloaded. :func:`release_freed_memory` gives the kept
memory back at the end of a fit (``malloc_trim``); the thresholds stay for later fits.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys

MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's ceiling for its own dynamic threshold on 64-bit systems
TRIM_THRESHOLD = 1024 * 1024 * 1024
_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
_USER_SETTINGS = (
    "GLIBC_TUNABLES",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_MMAP_MAX_",
)
_OTHER_MALLOCS = ("tcmalloc", "jemalloc", "mimalloc")

_tuned = False


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def why_not_tuned() -> str | None:
    """Why :func:`keep_freed_memory` would leave ``malloc`` alone in this process; ``None`` if it would not."""
    if _glibc() is None:
        return "the C library is not glibc"
    chosen = [name for name in _USER_SETTINGS if name in os.environ]
    if chosen:
        return f"{', '.join(chosen)} set in the environment"
    preloaded = os.environ.get("LD_PRELOAD", "")
    other = [name for name in _OTHER_MALLOCS if name in preloaded]
    if other:
        return f"{other[0]} preloaded"
    return None


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds (see the module docstring); ``True`` if they are set now."""
    global _tuned
    if _tuned:
        return True
    if why_not_tuned() is not None:
        return False
    libc = _glibc()
    assert libc is not None
    _tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    return _tuned


def release_freed_memory() -> None:
    """Give the freed heap back to the system (``malloc_trim(0)``), if :func:`keep_freed_memory` kept it."""
    libc = _glibc() if _tuned else None
    if libc is not None:
        libc.malloc_trim(0)
