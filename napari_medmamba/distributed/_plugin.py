"""The worker plugin (imports distributed; loaded only once distributed is known to exist)."""

from __future__ import annotations

import os
from typing import Any, Sequence

from distributed import WorkerPlugin

__all__ = ["MedmambaWorkerPlugin"]


class MedmambaWorkerPlugin(WorkerPlugin):
    """Per-worker setup: one GPU per worker, CPU thread limits, an empty model cache.

    ``gpus``: device ids (as in ``CUDA_VISIBLE_DEVICES``) handed out round-robin by the
    worker's name (LocalCluster names workers 0..N-1, and a restarted worker keeps its
    name, hence its GPU). ``CUDA_VISIBLE_DEVICES`` is set before the worker touches CUDA,
    so ``cuda`` in that worker means its own GPU. ``torch_threads``: CPU threads per worker
    for torch (intra-op, inter-op, the engine) and SimpleITK, so N workers on one machine do
    not oversubscribe its cores (see :func:`~napari_medmamba.distributed.threads.apply_thread_limit`).
    None leaves either alone. A model cache the worker already holds is kept.
    """

    name = "napari-medmamba"

    def __init__(self, gpus: Sequence[str] | None = None, torch_threads: int | None = None) -> None:
        self.gpus = list(gpus or [])
        self.torch_threads = torch_threads

    def setup(self, worker: Any) -> None:
        if self.gpus:
            os.environ["CUDA_VISIBLE_DEVICES"] = self.gpus[_worker_index(worker.name) % len(self.gpus)]
        if self.torch_threads:
            from .threads import apply_thread_limit

            apply_thread_limit(self.torch_threads)
        worker._medmamba_torch_threads = self.torch_threads
        if getattr(worker, "_medmamba_models", None) is None:
            worker._medmamba_models = {}
            worker._medmamba_model_loads = 0


def _worker_index(name: Any) -> int:
    """The worker's number (LocalCluster names them 0..N-1); a stable number for other names."""
    try:
        return int(name)
    except (TypeError, ValueError):
        return sum(map(ord, str(name)))
