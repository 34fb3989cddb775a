"""Process tuning for long embedding runs: reuse freed memory, keep the garbage collector
off the long-lived objects.

The ``radcache`` processes (``embed``, ``serve``, ``worker``) call :func:`reuse_memory`
at start and :func:`settle` once the model is loaded; a library user may do the same.
Both are measured in bench/README.md.

- **Memory.** Every series allocates volume-sized arrays (a 150×512×512 float32 volume is
  157 MB) and every batch tensors of tens of MB. glibc serves blocks above 32 MB with
  ``mmap`` and returns them on ``free``, so each new one is faulted in and zeroed page by
  page again: decoding a 150-slice CT took 0.071 s that way and 0.021 s with reuse.
  :func:`reuse_memory` keeps freed memory in the heap instead (``M_MMAP_MAX`` 0, no
  trimming), so the next series reuses it. The cost: the process keeps its peak memory.
- **Garbage collector.** torch, transformers and the model are about 400,000 tracked
  objects; a full collection walks all of them (about 0.2 s) whenever parsing thousands
  of DICOM headers triggers one, and interpreter shutdown walks them again (about 1 s).
  :func:`settle` moves everything alive into the permanent generation (``gc.freeze``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import logging

__all__ = ["reuse_memory", "settle"]

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc <malloc.h>


@functools.cache
def reuse_memory() -> bool:
    """Keep freed memory for reuse (glibc only). True when applied; runs once."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    mallopt = getattr(libc, "mallopt", None)
    applied = False
    if mallopt is not None and hasattr(libc, "gnu_get_libc_version"):
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        # mallopt returns 1 on success; the trim threshold is the largest int it takes.
        applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    log.debug("freed memory kept for reuse: %s", applied)
    return applied


def settle() -> None:
    """Freeze every object alive now (imports, model) out of the garbage collector's walks."""
    gc.freeze()
