"""Batch segmentation scaled out on a Dask distributed cluster (Qt-free; dask is optional).

Install with ``pip install 'napari-medmamba[dask]'``. Nothing here imports dask or
distributed at import time: :func:`require_distributed` does, with a clear message.

* :func:`run_batch` segments many scans on a cluster: tasks carry file paths (never
  arrays), each task segments one case straight to its final output file (atomic write)
  and returns the summary row; results are gathered as they complete.
* :func:`local_cluster` starts a LocalCluster (worker processes, one thread each, bound to
  127.0.0.1, no dashboard) with one GPU per worker when GPUs exist.
* :func:`segment_path` is the task; :class:`~napari_medmamba.distributed._plugin.MedmambaWorkerPlugin`
  pins a worker to its GPU and holds the worker-local model cache.
"""

from __future__ import annotations

from .batch import (
    DistributedUnavailable,
    connect,
    local_cluster,
    require_distributed,
    run_batch,
)
from .tasks import segment_path

__all__ = [
    "DistributedUnavailable",
    "connect",
    "local_cluster",
    "require_distributed",
    "run_batch",
    "segment_path",
]
