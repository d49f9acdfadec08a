"""The worker plugin (imports distributed; loaded only once distributed is known to exist)."""

from __future__ import annotations

import os
from typing import Any, Sequence

from distributed import WorkerPlugin

__all__ = ["MedmambaWorkerPlugin"]


class MedmambaWorkerPlugin(WorkerPlugin):
    """Per-worker setup: one GPU per worker, torch thread count, an empty model cache.

    ``gpus``: device ids (as in ``CUDA_VISIBLE_DEVICES``) handed out round-robin by the
    worker's name (LocalCluster names workers 0..N-1, and a restarted worker keeps its
    name, hence its GPU). ``CUDA_VISIBLE_DEVICES`` is set before the worker touches CUDA,
    so ``cuda`` in that worker means its own GPU. ``torch_threads``: intra-op threads per
    worker (so N CPU workers do not oversubscribe the cores). None leaves either alone.
    """

    name = "napari-medmamba"

    def __init__(self, gpus: Sequence[str] | None = None, torch_threads: int | None = None) -> None:
        self.gpus = list(gpus or [])
        self.torch_threads = torch_threads

    def setup(self, worker: Any) -> None:
        if self.gpus:
            try:
                index = int(worker.name)
            except (TypeError, ValueError):
                index = sum(map(ord, str(worker.name)))
            os.environ["CUDA_VISIBLE_DEVICES"] = self.gpus[index % len(self.gpus)]
        if self.torch_threads:
            import torch

            torch.set_num_threads(self.torch_threads)
        worker._medmamba_torch_threads = self.torch_threads
        worker._medmamba_models = {}
        worker._medmamba_model_loads = 0
