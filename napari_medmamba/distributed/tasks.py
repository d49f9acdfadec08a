"""Worker side: the per-case task and the worker-local model cache (no dask import needed)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

__all__ = ["segment_path", "cached_model", "output_stamp"]

LABEL_SUFFIX = "_labels.nii.gz"  # same as napari_medmamba.cli.LABEL_SUFFIX

# Fallback cache when a task runs outside a Dask worker (tests, synchronous scheduler).
_PROCESS_CACHE: dict[tuple[str, str], Any] = {}


def _worker() -> Any | None:
    try:
        from distributed import get_worker

        return get_worker()
    except (ImportError, ValueError):
        return None


def cached_model(name: str) -> tuple[Any, list[str]]:
    """``((net, contract, name), warnings)``, loaded at most once per worker process."""
    from ..inference import resolve_model

    worker = _worker()
    cache = getattr(worker, "_medmamba_models", None) if worker is not None else _PROCESS_CACHE
    if cache is None:  # worker without the plugin (e.g. someone else's cluster): cache on it anyway
        cache = {}
        worker._medmamba_models = cache
        worker._medmamba_model_loads = 0
    key = (name, "")
    if key not in cache:
        net, contract, resolved, warnings = resolve_model(name)
        cache[key] = ((net, contract, resolved), warnings)
        if worker is not None:
            worker._medmamba_model_loads = getattr(worker, "_medmamba_model_loads", 0) + 1
    return cache[key]


def output_stamp(path: str | Path) -> tuple[int, int] | None:
    """``(mtime_ns, size)`` of a file, or None when it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size


def _row_from_output(volume: Any, case: str, target: Path, model_name: str) -> dict[str, Any]:
    """Summary row for an output that an earlier attempt of this run already wrote."""
    import numpy as np

    from ..io import read_volume
    from ..models import get_model_spec

    labels = read_volume(target).array
    names = get_model_spec(model_name).contract.label_names
    counts = np.bincount(labels.ravel().astype(np.int64), minlength=len(names))
    row: dict[str, Any] = {
        "case": case, "status": "ok", "output": str(target),
        "shape": "x".join(str(s) for s in volume.shape),
        "spacing_mm": "x".join(f"{s:.4g}" for s in volume.geometry.spacing_zyx),
        "model": model_name, "device": "", "seconds": 0.0,
    }
    for value, name in enumerate(names[1:], start=1):
        row[f"{name}_ml"] = round(float(counts[value]) * volume.geometry.voxel_volume_ml, 4)
    return row


def segment_path(path: str, outdir: str, case: str, model: str, device: str = "auto", mode: str = "accurate",
                 stale: tuple[int, int] | None = None) -> dict[str, Any]:
    """Segment the scan at ``path`` into ``outdir/<case>_labels.nii.gz``; return its summary row.

    Runs on a worker. The output is written atomically, so a worker killed mid-case leaves
    no partial file and the rescheduled task simply redoes the case. ``stale`` is the
    ``(mtime_ns, size)`` the output had when the run started (None: absent): an output
    that differs from it was written by an earlier attempt of this same run (the worker
    died after writing, before reporting), so it is reported, not recomputed. Errors of
    the case (unreadable scan, bad input) come back as a ``failed: ...`` row, not raised.
    """
    from ..cli import segment_case
    from ..io import read_volume

    worker = _worker()
    where = worker.address if worker is not None else f"pid {os.getpid()}"
    target = Path(outdir) / f"{case}{LABEL_SUFFIX}"
    start = time.perf_counter()
    try:
        volume = read_volume(path)
        stamp = output_stamp(target)
        if stamp is not None and stamp != stale:
            row = _row_from_output(volume, case, target, model)
            row["status"] = "ok (written by an earlier attempt)"
        else:
            net_contract_name, _ = cached_model(model)
            row = segment_case(volume, case, Path(outdir), net_contract_name, device, mode, quiet=True)
    except Exception as exc:  # a bad case is reported; the other cases go on
        row = {"case": case, "status": f"failed: {exc}", "seconds": round(time.perf_counter() - start, 3)}
    row["worker"] = where
    return row
