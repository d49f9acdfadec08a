"""Worker side: the per-case task and the worker-local model cache (no dask import needed)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["segment_path", "cached_model", "output_stamp", "gpu_identity", "DIAGNOSTIC_COLUMNS"]

LABEL_SUFFIX = "_labels.nii.gz"  # same as napari_medmamba.cli.LABEL_SUFFIX

DIAGNOSTIC_COLUMNS = (
    "worker", "worker_name", "pid", "cuda_visible_devices", "gpu", "gpu_pci_bus_id",
    "torch_threads", "interop_threads", "sitk_threads",
    "case_s", "read_s", "load_s", "segment_s", "write_s",
    "seg_preprocess_s", "seg_inference_s", "seg_forward_s", "seg_resample_s", "seg_postprocess_s",
)
"""Columns each task adds after the summary row's own ones (None where a stage did not run).

``torch_threads`` is read inside the engine's segmentation (what it really used);
``case_s`` is the whole task (read + model load + segment + write); ``seg_*_s`` are the
engine's own stage timings within ``segment_s``. ``seconds`` stays segment + write, as in
the sequential CLI.
"""

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


def _row_from_output(volume: Any, case: str, target: Path, model_name: str,
                     postprocess: str = "recommended") -> dict[str, Any]:
    """Summary row for an output that an earlier attempt of this run already wrote."""
    from ..cli import postprocess_column, summary_row
    from ..inference.postprocessing import postprocess_for
    from ..io import read_volume
    from ..models import get_model_spec

    labels = read_volume(target).array
    contract = get_model_spec(model_name).contract
    names = contract.label_names
    column = postprocess_column(postprocess, postprocess_for(postprocess, contract), names)
    return summary_row(volume, case, target, model_name, "", 0.0, names, labels, postprocess=column)


@contextmanager
def _timed(stages: dict[str, float], key: str) -> Iterator[None]:
    """Record the wall seconds of the block in ``stages[key]`` (also when it raises)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        stages[key] = time.perf_counter() - start


def _thread_probe(probe: dict[str, Any]) -> Callable[[float, str], None]:
    """A progress callback that records torch's thread count inside the engine (its first call)."""

    def progress(fraction: float, stage: str) -> None:
        if "torch_threads" not in probe:
            import torch

            probe["torch_threads"] = torch.get_num_threads()

    return progress


def _pci_bus_id(props: Any, index: int) -> str:
    """``DDDDDDDD:BB:DD.0`` as nvidia-smi prints it; else the GPU's uuid or its physical id."""
    bus = getattr(props, "pci_bus_id", None)
    if bus is not None:
        return f"{int(getattr(props, 'pci_domain_id', 0)):08X}:{int(bus):02X}:{int(getattr(props, 'pci_device_id', 0)):02X}.0"
    uuid = getattr(props, "uuid", None)
    if uuid is not None:
        return f"GPU-{uuid}"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    physical = ids[index] if index < len(ids) else str(index)
    return f"{props.name} #{physical} (CUDA_VISIBLE_DEVICES={visible or 'unset'})"


def gpu_identity(device: str) -> dict[str, str]:
    """``{"gpu": name, "gpu_pci_bus_id": ...}`` of a torch CUDA device ('cuda:0'); empty strings otherwise."""
    if not str(device).startswith("cuda"):
        return {"gpu": "", "gpu_pci_bus_id": ""}
    try:
        import torch

        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        props = torch.cuda.get_device_properties(index)
        return {"gpu": str(props.name), "gpu_pci_bus_id": _pci_bus_id(props, index)}
    except Exception as exc:  # diagnostics never fail a case
        return {"gpu": f"unknown ({type(exc).__name__})", "gpu_pci_bus_id": ""}


def _diagnostics(worker: Any, where: str, device: str, stages: dict[str, float],
                 probe: dict[str, Any]) -> dict[str, Any]:
    """The :data:`DIAGNOSTIC_COLUMNS` of one task: worker, GPU, thread counts, stage seconds."""
    from .threads import thread_counts

    values: dict[str, Any] = {
        "worker": where, "worker_name": "" if worker is None else str(worker.name), "pid": os.getpid(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        **gpu_identity(device), **thread_counts(), **probe,
        **{key: round(seconds, 4) for key, seconds in stages.items()},
    }
    return {key: values.get(key) for key in DIAGNOSTIC_COLUMNS}


def segment_path(path: str, outdir: str, case: str, model: str, device: str = "auto", mode: str = "accurate",
                 stale: tuple[int, int] | None = None, postprocess: str = "recommended",
                 mirror: bool = False) -> dict[str, Any]:
    """Segment the scan at ``path`` into ``outdir/<case>_labels.nii.gz``; return its summary row.

    Runs on a worker. The output is written atomically, so a worker killed mid-case leaves
    no partial file and the rescheduled task simply redoes the case. ``stale`` is the
    ``(mtime_ns, size)`` the output had when the run started (None: absent): an output
    that differs from it was written by an earlier attempt of this same run (the worker
    died after writing, before reporting), so it is reported, not recomputed. Errors of
    the case (unreadable scan, bad input) come back as a ``failed: ...`` row, not raised.
    The row ends with the :data:`DIAGNOSTIC_COLUMNS` (worker, GPU, threads, stage seconds).
    ``postprocess`` is the clean-up choice ('recommended', 'none', 'largest') and ``mirror`` the test-time
    mirroring, as in the sequential CLI.
    """
    from ..cli import segment_case
    from ..io import read_volume

    worker = _worker()
    where = worker.address if worker is not None else f"pid {os.getpid()}"
    target = Path(outdir) / f"{case}{LABEL_SUFFIX}"
    stages: dict[str, float] = {}
    probe: dict[str, Any] = {}
    start = time.perf_counter()
    try:
        with _timed(stages, "read_s"):
            volume = read_volume(path)
        stamp = output_stamp(target)
        if stamp is not None and stamp != stale:
            row = _row_from_output(volume, case, target, model, postprocess)
            row["status"] = "ok (written by an earlier attempt)"
        else:
            with _timed(stages, "load_s"):
                net_contract_name, _ = cached_model(model)
            row = segment_case(volume, case, Path(outdir), net_contract_name, device, mode, quiet=True, stages=stages,
                               progress=_thread_probe(probe), postprocess=postprocess, mirror=mirror)
    except Exception as exc:  # a bad case is reported; the other cases go on
        row = {"case": case, "status": f"failed: {exc}", "seconds": round(time.perf_counter() - start, 3)}
    stages["case_s"] = time.perf_counter() - start
    row.update(_diagnostics(worker, where, row.get("device", ""), stages, probe))
    return row
