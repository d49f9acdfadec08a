"""Batch throughput: the ``segment`` CLI vs a Python API loop, and the CLI on 1 vs 2 Dask workers.

Every configuration runs in a fresh process on the same N cases into an empty folder and
is timed end to end (interpreter start, imports, model load, every case, summary), so
each pays the same fixed costs:

    python benchmarks/batch.py                                  # 10 hippocampus cases, CPU
    python benchmarks/batch.py --cases 40 --device cuda --workers 1 2   # 2 GPUs: 1 GPU per worker

* ``api``: ``read_volume`` + ``segment`` + ``write_labels`` in a loop (model resolved once,
  passed as ``(net, contract, name)``: the best plain-API usage);
* ``cli``: ``napari-medmamba segment CASES -o OUT -q`` (sequential, in-process);
* ``cli --workers N``: the same on a LocalCluster of N worker processes (``--workers`` list).

Prints a markdown table: seconds, cases/min and speed-up over ``api``. After each CLI configuration
it also prints a per-worker table read from that run's ``summary.csv`` (worker, device / GPU PCI bus id,
threads, cases, mean read / segment / write seconds), so a 2-GPU run shows at once whether both GPUs
were used and where the time goes.

Inputs: ``--data FOLDER`` with ``--pattern`` (default ``*.nii.gz``; a folder holding ``imagesTr/`` is
read from there), e.g. ``--data ../shared/data/openkbp --pattern '*_ct.nii.gz' --model lightm_unet_3d_hn_oar``
for CT, or ``--synthetic-ct N``: N synthetic CT-like volumes (128x192x192 int16, 2.5x2x2 mm, HU-valued
ellipsoids) written to a temporary folder, for GPU-heavy cases without shipped data:

    python benchmarks/batch.py --synthetic-ct 40 --model lightm_unet_3d_hn_oar --device cuda --skip-api --workers 1 2

``--marginal`` also runs every configuration on the first half of the cases and reports the marginal
throughput ``(N - N/2) / (t(N) - t(N/2))``: the fixed costs (interpreter, imports, Dask cluster start, model
load, CUDA start) cancel out, leaving the steady-state rate at which a configuration gets through a folder.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEDMAMBA_SHARED_DATA", ROOT.parent / "shared" / "data"))

API_LOOP = """
import sys
from pathlib import Path
from napari_medmamba.inference import resolve_model, segment
from napari_medmamba.io import read_volume, write_labels
from napari_medmamba.io.volume import scan_name
model, device, mode, out, *paths = sys.argv[1:]
net, contract, name, _ = resolve_model(model)
for path in paths:
    volume = read_volume(path)
    result = segment(volume, (net, contract, name), device=device, mode=mode)
    write_labels(result.labels.array, like=volume, path=Path(out) / f"{scan_name(path)}_labels.nii.gz")
"""


def run(label: str, command: list[str], n: int, out: Path) -> dict:
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    written = len(list(out.glob("*_labels.nii.gz")))
    if written != n:
        raise SystemExit(f"{label}: {written} outputs for {n} cases")
    row = {"config": label, "cases": n, "seconds": seconds, "cases_per_min": 60 * n / seconds,
           "summary": read_summary(out / "summary.csv")}
    print(f"{label}: {seconds:.1f} s", file=sys.stderr, flush=True)
    return row


def read_summary(path: Path) -> list[dict[str, str]]:
    """The rows of a ``segment`` summary.csv ([] when the configuration wrote none, e.g. the API loop)."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _mean(values: Sequence[str | None]) -> float | None:
    numbers = [float(v) for v in values if v not in (None, "")]
    return sum(numbers) / len(numbers) if numbers else None


def per_worker_stats(summary: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per worker of a summary: device / GPU, threads, cases, mean read/segment/write seconds.

    Rows without a ``worker`` column (the sequential CLI) count as one "(main process)".
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in summary:
        groups.setdefault(str(row.get("worker") or "(main process)"), []).append(row)
    stats = []
    for worker, rows in groups.items():
        devices = sorted({" / ".join(str(r[k]) for k in ("device", "gpu_pci_bus_id") if r.get(k)) for r in rows} - {""})
        threads = sorted({f"{r.get('torch_threads') or '?'}/{r.get('sitk_threads') or '?'}" for r in rows
                          if r.get("torch_threads") or r.get("sitk_threads")})
        stats.append({"worker": worker, "device": ", ".join(devices) or "-", "threads": ", ".join(threads) or "-",
                      "cases": len(rows), "ok": sum(str(r.get("status", "")).startswith("ok") for r in rows),
                      **{key: _mean([r.get(key) for r in rows]) for key in ("read_s", "segment_s", "write_s")}})
    return stats


def per_worker_table(summary: Sequence[dict[str, Any]]) -> str:
    """:func:`per_worker_stats` as a markdown table."""
    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    lines = ["| worker | device / GPU PCI bus id | threads torch/SimpleITK | cases (ok) | "
             "mean read s | mean segment s | mean write s |", "|---|---|---|---:|---:|---:|---:|"]
    for s in per_worker_stats(summary):
        lines.append(f"| {s['worker']} | {s['device']} | {s['threads']} | {s['cases']} ({s['ok']}) | "
                     f"{cell(s['read_s'])} | {cell(s['segment_s'])} | {cell(s['write_s'])} |")
    return "\n".join(lines)


def write_synthetic_ct(folder: Path, n: int, shape: tuple[int, int, int] = (128, 192, 192),
                       spacing_zyx: tuple[float, float, float] = (2.5, 2.0, 2.0), seed: int = 0) -> list[Path]:
    """Write ``n`` CT-like int16 volumes (air, a body of soft tissue, bone, a few organs, noise) as NIfTI."""
    import numpy as np

    from napari_medmamba.io import Geometry, Volume, write_volume

    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    centre = np.array(shape) / 2.0

    def ellipsoid(c: Sequence[float], r: Sequence[float]) -> Any:
        return ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2 <= 1.0

    paths = []
    for i in range(n):
        array = np.full(shape, -1000, dtype=np.int16)  # air
        body = centre * rng.uniform(0.75, 0.9, 3)
        array[ellipsoid(centre, body)] = 40  # soft tissue
        array[ellipsoid(centre + rng.normal(0, 4, 3), body * [0.9, 0.35, 0.3])] = 700  # bone
        for _ in range(4):  # organs of 20-80 HU
            c = centre + rng.uniform(-0.5, 0.5, 3) * body
            array[ellipsoid(c, rng.uniform(4, 14, 3))] = rng.integers(20, 80)
        array += rng.normal(0, 15, shape).astype(np.int16)
        geometry = Geometry(spacing=tuple(reversed(spacing_zyx)), origin=(0.0, 0.0, 0.0))
        paths.append(write_volume(Volume(array, geometry, modality="CT"), folder / f"synthetic_ct_{i:03d}.nii.gz"))
    return paths


def input_paths(args: argparse.Namespace, tmp: Path) -> tuple[list[str], str]:
    """The cases to run and a description of them (synthetic CT into ``tmp``, or ``--data``/``--pattern``)."""
    if args.synthetic_ct:
        paths = write_synthetic_ct(tmp, args.synthetic_ct)
        return [str(p) for p in paths], "synthetic CT 128x192x192 at 2.5x2x2 mm"
    data = args.data / "imagesTr" if (args.data / "imagesTr").is_dir() else args.data
    paths = [str(p) for p in sorted(data.glob(args.pattern))[: args.cases]]
    if len(paths) < args.cases:
        raise SystemExit(f"only {len(paths)} cases match {args.pattern} in {data}")
    name = data.parent.name if data.name == "imagesTr" else data.name
    return paths, name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=10, help="number of cases (default: %(default)s)")
    parser.add_argument("--data", type=Path, default=SHARED / "msd_hippocampus" / "imagesTr",
                        help="folder of cases (or one holding imagesTr/) (default: %(default)s)")
    parser.add_argument("--pattern", default="*.nii.gz",
                        help="file pattern in --data, e.g. '*_ct.nii.gz' for OpenKBP (default: %(default)s)")
    parser.add_argument("--synthetic-ct", type=int, default=0, metavar="N",
                        help="use N synthetic CT volumes (128x192x192, 2.5x2x2 mm) instead of --data/--cases")
    parser.add_argument("--model", default="lightm_unet_3d", help="registered model (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (one GPU per worker)")
    parser.add_argument("--mode", default="accurate", choices=["accurate", "fast"])
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2], help="worker counts for the Dask runs")
    parser.add_argument("--skip-api", action="store_true", help="only the CLI runs")
    parser.add_argument("--marginal", action="store_true",
                        help="also time N/2 cases and report the steady-state (marginal) throughput")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as inputs:
        paths, dataset = input_paths(args, Path(inputs))
        rows = run_configs(args, paths)
    report(args, rows, len(paths), dataset)


def run_configs(args: argparse.Namespace, paths: list[str]) -> list[dict]:
    """Time every configuration (and its N/2 run with ``--marginal``); print a per-worker table after each."""
    cli = [sys.executable, "-m", "napari_medmamba.cli", "segment", *paths, "--model", args.model,
           "--device", args.device, "--mode", args.mode, "-q"]
    configs: list[tuple[str, list[str]]] = []
    if not args.skip_api:
        configs.append(("api loop", [sys.executable, "-c", API_LOOP, args.model, args.device, args.mode, "{out}", *paths]))
    configs.append(("cli", [*cli, "-o", "{out}"]))
    configs += [(f"cli --workers {n}", [*cli, "-o", "{out}", "--workers", str(n)]) for n in args.workers]

    rows = []
    half = paths[: len(paths) // 2]
    for label, command in configs:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(run(label, [c.replace("{out}", tmp) for c in command], len(paths), Path(tmp)))
        if rows[-1]["summary"]:
            print(f"\n{label}: per worker\n\n{per_worker_table(rows[-1]['summary'])}\n", flush=True)
        if args.marginal:
            short = [c for c in command if c not in set(paths[len(half):])]
            with tempfile.TemporaryDirectory() as tmp:
                rows[-1]["half_seconds"] = run(f"{label} (N/2)", [c.replace("{out}", tmp) for c in short],
                                               len(half), Path(tmp))["seconds"]
            extra = rows[-1]["seconds"] - rows[-1]["half_seconds"]
            rows[-1]["marginal_cases_per_min"] = 60.0 * (len(paths) - len(half)) / extra if extra > 0 else float("nan")
    return rows


def report(args: argparse.Namespace, rows: list[dict], n: int, dataset: str) -> None:
    """Print the configuration table (and the marginal one)."""
    import platform

    base = rows[0]["seconds"]
    print(f"\n{n} cases of {dataset}, model {args.model}, mode {args.mode}, device {args.device}, "
          f"{os.cpu_count()} CPU cores, Python {platform.python_version()}\n")
    print(f"| configuration | seconds | cases/min | speed-up vs {rows[0]['config']} |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {r['seconds']:.1f} | {r['cases_per_min']:.1f} | {base / r['seconds']:.2f}x |")
    if args.marginal:
        ref = rows[0]["marginal_cases_per_min"]
        print(f"\n| configuration | seconds N/2 -> N | marginal cases/min | speed-up vs {rows[0]['config']} |")
        print("|---|---:|---:|---:|")
        for r in rows:
            print(f"| {r['config']} | {r['half_seconds']:.1f} -> {r['seconds']:.1f} | "
                  f"{r['marginal_cases_per_min']:.1f} | {r['marginal_cases_per_min'] / ref:.2f}x |")


if __name__ == "__main__":
    main()
