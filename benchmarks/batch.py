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

Prints a markdown table: seconds, cases/min and speed-up over ``api``.

``--marginal`` also runs every configuration on the first half of the cases and reports the marginal
throughput ``(N - N/2) / (t(N) - t(N/2))``: the fixed costs (interpreter, imports, Dask cluster start, model
load, CUDA start) cancel out, leaving the steady-state rate at which a configuration gets through a folder.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
    row = {"config": label, "cases": n, "seconds": seconds, "cases_per_min": 60 * n / seconds}
    print(f"{label}: {seconds:.1f} s", file=sys.stderr, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=10, help="number of cases (default: %(default)s)")
    parser.add_argument("--data", type=Path, default=SHARED / "msd_hippocampus" / "imagesTr")
    parser.add_argument("--model", default="lightm_unet_3d")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (one GPU per worker)")
    parser.add_argument("--mode", default="accurate", choices=["accurate", "fast"])
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2], help="worker counts for the Dask runs")
    parser.add_argument("--skip-api", action="store_true", help="only the CLI runs")
    parser.add_argument("--marginal", action="store_true",
                        help="also time N/2 cases and report the steady-state (marginal) throughput")
    args = parser.parse_args()

    paths = [str(p) for p in sorted(args.data.glob("*.nii.gz"))[: args.cases]]
    if len(paths) < args.cases:
        raise SystemExit(f"only {len(paths)} cases in {args.data}")
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
        if args.marginal:
            short = [c for c in command if c not in set(paths[len(half):])]
            with tempfile.TemporaryDirectory() as tmp:
                rows[-1]["half_seconds"] = run(f"{label} (N/2)", [c.replace("{out}", tmp) for c in short],
                                               len(half), Path(tmp))["seconds"]
            extra = rows[-1]["seconds"] - rows[-1]["half_seconds"]
            rows[-1]["marginal_cases_per_min"] = 60.0 * (len(paths) - len(half)) / extra if extra > 0 else float("nan")

    base = rows[0]["seconds"]
    import platform

    print(f"\n{len(paths)} cases of {args.data.parent.name}, model {args.model}, mode {args.mode}, device {args.device}, "
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
