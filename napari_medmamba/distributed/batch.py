"""Client side: start or join a Dask cluster, submit one task per case, gather as completed."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .tasks import LABEL_SUFFIX, output_stamp, segment_path
from .threads import threads_per_worker as default_threads_per_worker

__all__ = ["DistributedUnavailable", "require_distributed", "local_cluster", "connect", "run_batch"]

INSTALL_HINT = "pip install 'napari-medmamba[dask]'"


class DistributedUnavailable(ImportError):
    """dask.distributed is not installed."""


def require_distributed() -> Any:
    """Import and return ``distributed``, or raise :class:`DistributedUnavailable` saying how to get it."""
    try:
        import distributed
    except ImportError as exc:
        raise DistributedUnavailable(
            f"scaling out with --workers/--scheduler needs dask.distributed, which is not installed: {INSTALL_HINT}"
        ) from exc
    return distributed


def _visible_gpus(device: str) -> list[str]:
    """GPU ids this machine offers for ``device`` ('cpu' -> none)."""
    if device == "cpu":
        return []
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no torch CUDA build / driver: CPU only
        return []


@contextmanager
def local_cluster(n_workers: int, device: str = "auto", log: Callable[[str], None] | None = None,
                  quiet_logs: bool = True, threads_per_worker: int | None = None) -> Iterator[Any]:
    """A Client on a fresh LocalCluster: ``n_workers`` processes, 1 task thread each, on 127.0.0.1.

    The dashboard is off and every port listens on localhost only. With GPUs (and
    ``device`` not 'cpu') worker *i* gets ``CUDA_VISIBLE_DEVICES`` = the i-th visible GPU
    (round-robin when there are more workers than GPUs). Each worker gets
    ``threads_per_worker`` CPU threads for torch and SimpleITK (default
    ``max(1, cpu_count // n_workers)``), on the GPU as on the CPU.
    """
    if n_workers < 1:
        raise ValueError(f"--workers must be at least 1, got {n_workers}")
    if threads_per_worker is not None and threads_per_worker < 1:
        raise ValueError(f"--threads-per-worker must be at least 1, got {threads_per_worker}")
    distributed = require_distributed()
    from ._plugin import MedmambaWorkerPlugin

    gpus = _visible_gpus(device)
    if device == "cuda" and not gpus:
        raise RuntimeError("--device cuda was asked for but no CUDA GPU is visible")
    if gpus and n_workers > len(gpus) and log:
        log(f"warning: {n_workers} workers share {len(gpus)} GPU(s) round-robin")
    threads = threads_per_worker or default_threads_per_worker(n_workers)
    cluster = distributed.LocalCluster(
        n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
        dashboard_address=None, worker_dashboard_address=None,
        silence_logs=logging.ERROR if quiet_logs else logging.WARNING,
    )
    client = distributed.Client(cluster)
    try:
        client.register_plugin(MedmambaWorkerPlugin(gpus, threads))
        yield client
    finally:
        client.close()
        cluster.close()


@contextmanager
def connect(address: str, timeout: float | None = None, threads_per_worker: int | None = None) -> Iterator[Any]:
    """A Client on an existing scheduler (``tcp://host:8786``, ``tls://host:8786``).

    TLS certificates come from Dask's configuration (``distributed.comm.tls.*``, e.g. the
    ``DASK_DISTRIBUTED__COMM__TLS__CA_FILE`` environment variables). Workers keep whatever
    GPU and thread settings they were started with, unless ``threads_per_worker`` is given:
    then every worker (and any that joins later) gets that many torch/SimpleITK threads.
    The model cache is set up lazily. ``timeout`` (seconds) defaults to
    ``distributed.comm.timeouts.connect`` (30 s).
    """
    if threads_per_worker is not None and threads_per_worker < 1:
        raise ValueError(f"--threads-per-worker must be at least 1, got {threads_per_worker}")
    distributed = require_distributed()
    client = distributed.Client(address, **({} if timeout is None else {"timeout": timeout}))
    try:
        if threads_per_worker is not None:
            from ._plugin import MedmambaWorkerPlugin

            client.register_plugin(MedmambaWorkerPlugin(None, threads_per_worker))
        yield client
    finally:
        client.close()


def run_batch(
    client: Any,
    paths: Sequence[str | Path],
    outdir: str | Path,
    model: str,
    device: str = "auto",
    mode: str = "accurate",
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
    task: Callable[..., dict[str, Any]] = segment_path,
    retries: int = 1,
    postprocess: str = "recommended",
    mirror: bool = False,
) -> list[dict[str, Any]]:
    """Segment ``paths`` on ``client``'s cluster into ``outdir``; one summary row per case, in input order.

    Tasks carry absolute paths, so workers need the same file system view (a shared
    folder on a remote cluster). Cases whose output exists are skipped unless
    ``overwrite``. A worker that dies mid-case has that case rescheduled on another worker
    by the scheduler (up to ``distributed.scheduler.allowed-failures`` deaths per case);
    outputs are written atomically under deterministic names, so a retried case leaves one
    complete file and one row. ``task`` is the per-case function (for tests). ``postprocess`` is the
    clean-up choice of :func:`napari_medmamba.cli.segment_case` ('recommended', 'none' or 'largest'); ``mirror``
    its test-time mirroring.
    """
    import uuid

    from ..io.volume import scan_name

    run_id = uuid.uuid4().hex[:8]  # keys unique per run: two runs on one scheduler never share futures
    say = log or (lambda message: None)
    outdir = Path(outdir).resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    rows: dict[int, dict[str, Any]] = {}
    seen: dict[str, int] = {}
    futures: dict[Any, int] = {}
    for index, path in enumerate(paths):
        case = scan_name(path)
        target = outdir / f"{case}{LABEL_SUFFIX}"
        if case in seen:  # two inputs, one output file: never let two workers race on it
            rows[index] = {"case": case, "status": f"failed: same case name as input {seen[case] + 1}, output {target.name}"}
            say(f"[{case}] failed: duplicate case name")
            continue
        seen[case] = index
        if target.exists() and not overwrite:
            rows[index] = {"case": case, "status": "skipped (exists)", "output": str(target)}
            say(f"[{case}] exists, skipped (use --overwrite to redo)")
            continue
        stale = output_stamp(target) if overwrite else None
        future = client.submit(task, str(Path(path).resolve()), str(outdir), case, model, device, mode, stale,
                               postprocess, mirror, key=f"medmamba-segment-{case}-{run_id}", pure=False, retries=retries)
        futures[future] = index
    total = len(futures)
    if total:
        say(f"{total} case(s) on {len(client.scheduler_info().get('workers', {}))} worker(s)")
    distributed = require_distributed() if total else None
    done = 0
    try:
        for future in (distributed.as_completed(list(futures)) if total else []):
            index = futures[future]
            case = scan_name(paths[index])
            try:
                row = future.result()
            except Exception as exc:  # KilledWorker (died too often), lost scheduler, ...
                row = {"case": case, "status": f"failed: {type(exc).__name__}: {exc}"}
            rows[index] = row
            done += 1
            status = row["status"]
            where = f" on {row['worker']}" if row.get("worker") else ""
            where += f" (GPU {row['gpu_pci_bus_id']})" if row.get("gpu_pci_bus_id") else ""
            timing = f" {row['seconds']:.1f} s" if isinstance(row.get("seconds"), (int, float)) else ""
            say(f"[{case}] {status}{timing}{where} ({done}/{total})")
    finally:
        for future in futures:
            if not future.done():
                future.cancel()
    return [rows[i] for i in sorted(rows)]
