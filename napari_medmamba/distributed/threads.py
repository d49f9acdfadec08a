"""CPU thread limits for worker processes that share one machine (no dask import needed).

N worker processes on one host each default to every core in torch (the inference engine
asks for all physical cores per call unless ``$MEDMAMBA_NUM_THREADS`` caps it) and in SimpleITK, so N workers oversubscribe the CPU.
:func:`apply_thread_limit` caps both in the calling process; the worker plugin calls it.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["available_cpus", "threads_per_worker", "apply_thread_limit", "thread_counts"]


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads_per_worker(n_workers: int, cpus: int | None = None) -> int:
    """``max(1, cpus // n_workers)``: the default share of the cores for each of ``n_workers`` local workers."""
    return max(1, (available_cpus() if cpus is None else cpus) // max(1, n_workers))


def _cap_engine_threads(n: int) -> None:
    """Make :func:`napari_medmamba.inference.segment` use at most ``n`` intra-op threads in this process.

    The engine uses one thread per physical core for each call unless ``$MEDMAMBA_NUM_THREADS`` caps it.
    """
    from ..inference.planner import THREADS_ENV

    os.environ[THREADS_ENV] = str(n)


def apply_thread_limit(n: int) -> dict[str, int]:
    """Use ``n`` threads for torch (intra-op, inter-op where still allowed), the engine and SimpleITK.

    Returns :func:`thread_counts` afterwards. Inter-op threads can only be set before
    torch starts inter-op work in this process; later calls keep the current pool.
    """
    import SimpleITK as sitk
    import torch

    n = max(1, int(n))
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # already set, or inter-op work already started in this process
        pass
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)
    _cap_engine_threads(n)
    return thread_counts()


def thread_counts() -> dict[str, Any]:
    """This process's torch intra-op and inter-op thread counts and SimpleITK's default thread count."""
    import SimpleITK as sitk
    import torch

    return {"torch_threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "sitk_threads": sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()}
