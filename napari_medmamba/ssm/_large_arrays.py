"""Large output arrays of the CPU scan, backed by transparent huge pages where Linux offers them.

glibc serves every allocation of 32 MiB or more with a fresh ``mmap``, so each call of the scan on a
long sequence (e.g. (1, 32, 262144) float32 rows) page-faults its outputs in 4 KiB at a time: about
10 ms per 32 MiB on a 2-core EPYC (a forward+backward at (1, 32, 262144, 16) makes seven such arrays; with
huge pages it ran 141-144 ms instead of 155-160 ms, docs/benchmarks.md). An anonymous private
mapping advised ``MADV_HUGEPAGE`` faults in 2 MiB pages instead (1.6 ms per 32 MiB there). This is what
PyTorch's ``THP_MEM_ALLOC_ENABLE`` and glibc's ``glibc.malloc.hugetlb`` do, but both must be set before
the process starts. Elsewhere (no ``MADV_HUGEPAGE``, small arrays, or ``MEDMAMBA_HUGE_PAGES=0`` in the
environment) these are plain ``np.empty`` / ``np.zeros``. The mapping is released when the last array (or
tensor) viewing it is freed.
"""

from __future__ import annotations

import mmap
import os

import numpy as np

__all__ = ["empty", "zeros", "HUGE_MIN_BYTES", "ENV_VAR"]

#: set to 0 to turn the huge-page mappings off (plain NumPy arrays), e.g. to compare
ENV_VAR = "MEDMAMBA_HUGE_PAGES"

#: arrays at least this large get their own huge-page mapping: glibc's largest mmap threshold. Smaller
#: ones glibc recycles from its heap without new page faults; mapping those fresh each call measured slower
#: (forward+backward at (2, 64, 32768, 16), whose outputs are 16 MiB each: 61 ms plain, 64-71 ms mapped).
HUGE_MIN_BYTES = 32 << 20
_HUGE_PAGE = 2 << 20
_CAN_ADVISE = hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_ANONYMOUS")


def _mapped(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
    """A zero-filled C-contiguous array on a huge-page-advised mapping, or None if that is not possible."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    nbytes = count * dtype.itemsize
    if not _CAN_ADVISE or nbytes < HUGE_MIN_BYTES or os.environ.get(ENV_VAR, "1").strip() == "0":
        return None
    try:
        region = mmap.mmap(-1, nbytes + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        region.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        return None
    start = np.frombuffer(region, dtype=np.uint8, count=1).ctypes.data
    offset = -start % _HUGE_PAGE  # start on a huge-page boundary so every 2 MiB of the array is one page
    return np.frombuffer(region, dtype=dtype, count=count, offset=offset).reshape(shape)


def empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """Like ``np.empty`` (the contents of a mapped array happen to be zero)."""
    mapped = _mapped(tuple(shape), dtype)
    return np.empty(shape, dtype=dtype) if mapped is None else mapped


def zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """Like ``np.zeros``."""
    mapped = _mapped(tuple(shape), dtype)
    return np.zeros(shape, dtype=dtype) if mapped is None else mapped
