"""Inference engine benchmark: wall time, peak memory and engine overhead per volume, model and mode.

Each run happens in a fresh process (so peak RSS is that run's own), on the current device:

    python benchmarks/inference.py                       # every registered model, both modes
    python benchmarks/inference.py --models unet_3d --modes fast --volumes synthetic
    python benchmarks/inference.py --dice                 # also Dice(fast vs accurate) per model

Volumes: the shared flipped CT (totalseg/example_ct.nii.gz), the shared DICOM series
(totalseg/example_ct_dicom) and a synthetic 512x512x300 CT-like volume. Prints a markdown
table in the layout of TotalSegmentator's runtime table (volume, device, time, memory),
plus engine overhead = end-to-end time / sum of pure forward-pass times.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEDMAMBA_SHARED_DATA", ROOT.parent / "shared" / "data"))
VOLUMES = ("ct", "dicom", "synthetic")


def synthetic_ct(shape: tuple[int, int, int] = (300, 512, 512)):
    """A CT-sized int16 volume (0.8 x 0.8 x 1.5 mm): air, an elliptic body, a bright 'spine', noise."""
    import numpy as np

    from napari_medmamba.io.volume import Geometry, Volume

    z, y, x = shape
    yy, xx = np.ogrid[:y, :x]
    body = ((yy - y / 2) / (0.38 * y)) ** 2 + ((xx - x / 2) / (0.45 * x)) ** 2 < 1
    spine = ((yy - 0.65 * y) / (0.05 * y)) ** 2 + ((xx - x / 2) / (0.05 * x)) ** 2 < 1
    plane = np.where(body, 40, -1000).astype(np.int16)
    plane[spine] = 700
    rng = np.random.default_rng(0)
    array = np.repeat(plane[None], z, axis=0)
    array += rng.integers(-20, 21, size=(1, y, x), dtype=np.int16)
    return Volume(array, Geometry((0.8, 0.8, 1.5), (-204.8, -204.8, -450.0)), modality="CT")


def load(volume: str):
    from napari_medmamba.io import read_volume

    if volume == "ct":
        return read_volume(SHARED / "totalseg" / "example_ct.nii.gz")
    if volume == "dicom":
        return read_volume(SHARED / "totalseg" / "example_ct_dicom")
    return synthetic_ct()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def child(args: argparse.Namespace) -> None:
    """One run: prints a JSON line; saves the labels to ``args.labels_out`` when given."""
    import numpy as np
    import torch

    from napari_medmamba.inference import segment
    from napari_medmamba.inference.engine import resolve_model

    vol = load(args.volume)
    net, contract, name, _ = resolve_model(args.model)  # "with the model loaded": loading is not timed
    walls = []
    for _ in range(args.runs):  # later runs: kernels compiled and caches warm, as in a napari session
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        result = segment(vol, (net, contract, name), device=args.device, mode=args.mode, precision=args.precision,
                         return_probabilities=not args.no_probabilities)
        walls.append(time.perf_counter() - t0)
    wall = walls[-1]
    vram = torch.cuda.max_memory_allocated() / 2**20 if result.device.startswith("cuda") else None
    if args.labels_out:
        np.save(args.labels_out, result.labels.array)
    print(json.dumps({
        "volume": args.volume, "shape": list(vol.shape), "model": args.model, "mode": args.mode,
        "device": result.device, "wall_s": wall, "first_run_s": walls[0], "runs": args.runs,
        "probabilities": not args.no_probabilities, "timings": result.timings, "peak_rss_mb": _peak_rss_mb(),
        "peak_vram_mb": vram, "overhead": result.timings["total"] / max(result.timings["forward"], 1e-9),
        "threads": torch.get_num_threads(), "warnings": result.warnings,
    }))


def run_one(volume: str, model: str, mode: str, device: str, precision: str, timeout: float,
            labels_out: str | None, runs: int = 1, no_probabilities: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", "--volume", volume, "--model", model, "--mode", mode,
           "--device", device, "--precision", precision, "--runs", str(runs)]
    cmd += (["--labels-out", labels_out] if labels_out else []) + (["--no-probabilities"] if no_probabilities else [])
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"volume": volume, "model": model, "mode": mode, "error": f"> {timeout:.0f} s (stopped)"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return {"volume": volume, "model": model, "mode": mode, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(lines[-1])


def dice_fast_vs_accurate(fast: str, accurate: str) -> float:
    """Mean Dice over the foreground classes present in either map."""
    import numpy as np

    a, b = np.load(fast), np.load(accurate)
    scores = [2 * np.count_nonzero((a == c) & (b == c)) / (np.count_nonzero(a == c) + np.count_nonzero(b == c))
              for c in np.union1d(np.unique(a), np.unique(b)) if c != 0]
    return float(np.mean(scores)) if scores else float("nan")


def table(rows: list[dict], dice: dict[tuple[str, str], float]) -> str:
    head = ("| volume | shape (z, y, x) | model | mode | device | probabilities | time (s) | first run (s) "
            "| peak RSS (GB) | peak VRAM (GB) | forward (s) | back to source grid (s) | overhead | Dice fast vs accurate |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['volume']} | | {r['model']} | {r['mode']} | | | {r['error']} | | | | | | | |")
            continue
        d = dice.get((r["volume"], r["model"])) if r["mode"] == "fast" else None
        vram = f"{r['peak_vram_mb'] / 1024:.2f}" if r["peak_vram_mb"] is not None else "-"
        lines.append(
            f"| {r['volume']} | {'x'.join(map(str, r['shape']))} | {r['model']} | {r['mode']} | {r['device']} "
            f"| {'yes' if r.get('probabilities', True) else 'no'} | {r['wall_s']:.2f} | {r.get('first_run_s', r['wall_s']):.2f} "
            f"| {r['peak_rss_mb'] / 1024:.2f} | {vram} | {r['timings']['forward']:.2f} | {r['timings']['resample']:.2f} "
            f"| {r['overhead']:.2f} | {'-' if d is None else f'{d:.3f}'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", help="registered model names (default: all)")
    parser.add_argument("--modes", nargs="*", default=["fast", "accurate"], choices=["fast", "accurate"])
    parser.add_argument("--volumes", nargs="*", default=list(VOLUMES), choices=VOLUMES)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run before it is stopped")
    parser.add_argument("--runs", type=int, default=1,
                        help="segment() calls per process with the model loaded once; the table shows the last "
                             "(warm: kernels compiled) and the first")
    parser.add_argument("--no-probabilities", action="store_true",
                        help="do not return per-class probabilities (labels and uncertainty only)")
    parser.add_argument("--dice", action="store_true", help="report Dice(fast vs accurate) (needs both modes)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--volume", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--labels-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.child:
        child(args)
        return
    from napari_medmamba.models import list_models

    models = args.models or list_models()
    rows: list[dict] = []
    dice: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for volume in args.volumes:
            for model in models:
                saved: dict[str, str] = {}
                for mode in args.modes:
                    out = str(Path(tmp) / f"{volume}-{model}-{mode}.npy") if args.dice else None
                    row = run_one(volume, model, mode, args.device, args.precision, args.timeout, out, args.runs,
                                  args.no_probabilities)
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
                    if out and "error" not in row:
                        saved[mode] = out
                if len(saved) == 2:
                    dice[(volume, model)] = dice_fast_vs_accurate(saved["fast"], saved["accurate"])
    print(table(rows, dice))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "dice": {f"{v}/{m}": d for (v, m), d in dice.items()}}, indent=1))


if __name__ == "__main__":
    main()
