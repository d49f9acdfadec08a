"""Large CPU buffers reused from the heap while a model runs on the CPU, instead of fresh mappings (glibc).

glibc serves every allocation above its mmap threshold (which grows to at most 32 MiB) with a fresh ``mmap``
and returns it with ``munmap`` when freed, so each large tensor of a forward pass is page-faulted in 4 KiB at a
time, every time. LightM-UNet's full-resolution Mamba layers allocate many such tensors: (64 channels x
89 600 tokens) for a hippocampus patch, 4-6x that for a head-and-neck CT box. Inside
:func:`reuse_large_allocations` the threshold is raised, so freed buffers go back to the heap and the next
tensor reuses pages that are already mapped: the hippocampus forward ran 449 -> 393 ms and a 64 x 96 x 128 CT
box 6.1 -> 5.1 s on a 2-core EPYC (``benchmarks/cpu_forward.py``; docs/benchmarks.md). On leaving, glibc's
usual limits come back and ``malloc_trim`` hands the freed heap back to the system, so memory use after a run
is what it was before.

Elsewhere (not glibc, or ``MEDMAMBA_HEAP_REUSE=0`` in the environment) the context does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import threading
from contextlib import contextmanager, nullcontext
from functools import lru_cache
from typing import Callable, Iterator, TypeVar

__all__ = ["ENV_VAR", "reuse_large_allocations", "reusing_large_allocations_on_cpu", "is_active"]

#: set to 0 to keep glibc's own allocation policy (e.g. to compare)
ENV_VAR = "MEDMAMBA_HEAP_REUSE"

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_RUN_MMAP_THRESHOLD = 1 << 30
"""Inside the context: buffers up to 1 GiB come from the heap (a 128^3 CT box's largest is about 0.5 GiB)."""
_RUN_TRIM_THRESHOLD = 1 << 30
_DEFAULT_MMAP_THRESHOLD = 32 << 20
"""After the context: glibc's largest dynamic mmap threshold on 64-bit systems, where a long-running PyTorch
process settles (setting any value turns the dynamic adjustment off)."""
_DEFAULT_TRIM_THRESHOLD = 2 * _DEFAULT_MMAP_THRESHOLD  # what glibc pairs with that threshold

_F = TypeVar("_F", bound=Callable)

_lock = threading.Lock()
_depth = 0


@lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    """glibc's ``mallopt`` and ``malloc_trim``, or None on other C libraries."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (musl and macOS do not)
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def is_active() -> bool:
    """True while some thread is inside :func:`reuse_large_allocations` with the policy applied."""
    return _depth > 0


@contextmanager
def reuse_large_allocations() -> Iterator[None]:
    """Within the block, large freed CPU buffers are kept for reuse (see the module docstring).

    Process-wide and re-entrant: nested or concurrent blocks share one policy, restored when the last exits.
    """
    global _depth
    libc = None if os.environ.get(ENV_VAR, "1") == "0" else _glibc()
    if libc is None:
        yield
        return
    with _lock:
        if _depth == 0:
            libc.mallopt(_M_MMAP_THRESHOLD, _RUN_MMAP_THRESHOLD)
            libc.mallopt(_M_TRIM_THRESHOLD, _RUN_TRIM_THRESHOLD)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(_M_MMAP_THRESHOLD, _DEFAULT_MMAP_THRESHOLD)
                libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
                libc.malloc_trim(0)


def reusing_large_allocations_on_cpu(fn: _F) -> _F:
    """Decorator for a function with a keyword argument ``device`` ("auto", "cpu", "cuda", ...): calls that run
    on the CPU run inside :func:`reuse_large_allocations` (training steps: 2.3 -> 1.8 s for a hippocampus
    fine-tuning batch, 26 -> 19 s for a head-and-neck CT one, on 2 cores)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .inference.planner import choose_device

        on_cpu = choose_device(kwargs.get("device", "auto")).type == "cpu"
        with reuse_large_allocations() if on_cpu else nullcontext():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
