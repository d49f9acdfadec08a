"""Scan IO benchmark: read time and peak memory of ``read_volume`` per file format.

Writes a synthetic 512 x 512 x 600 int16 CT-like volume (about 315 MB) to a temporary
folder as .nii.gz, .nrrd and .mha (with ``write_volume``, so compressed), then reads each
file in a fresh Python process and prints a markdown table. Peak RSS is the reading
process's ``ru_maxrss`` after reading minus its value after the imports.

Linux carries ``ru_maxrss`` over ``exec`` from the parent process, so the volume is made
and written in a child process as well and this parent never holds it.

    python benchmarks/io.py [--shape Z Y X] [--formats .nii.gz .nrrd .mha]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

READ_CHILD = r"""
import json, resource, sys, time
from napari_medmamba.io import read_volume
scale = 1 if sys.platform.startswith("linux") else 1 / 1024  # ru_maxrss: KiB on Linux, bytes on macOS
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
start = time.perf_counter()
volume = read_volume(sys.argv[1])
seconds = time.perf_counter() - start
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
print(json.dumps({"seconds": seconds, "peak_kib": after - before, "nbytes": volume.array.nbytes}))
"""


def synthetic_ct(shape: tuple[int, int, int], seed: int = 0):  # -> np.ndarray
    """An int16 body-like phantom: air at -1000 HU, a soft-tissue ellipsoid with noise."""
    import numpy as np

    z, y, x = shape
    rng = np.random.default_rng(seed)
    yy, xx = np.ogrid[:y, :x]
    body = ((yy - y / 2) / (0.4 * y)) ** 2 + ((xx - x / 2) / (0.45 * x)) ** 2 <= 1.0
    array = np.full(shape, -1000, dtype=np.int16)
    for k in range(z):
        array[k][body] = rng.normal(40.0, 20.0, size=int(body.sum())).astype(np.int16)
    return array


def write_files(folder: Path, shape: tuple[int, int, int], formats: list[str]) -> dict[str, float]:
    """Write the phantom in each format; returns write seconds per format (child process)."""
    from napari_medmamba.io import Geometry, Volume, write_volume

    volume = Volume(synthetic_ct(shape), Geometry((0.8, 0.8, 1.0), (-204.8, -204.8, -300.0)))
    seconds = {}
    for ext in formats:
        start = time.perf_counter()
        write_volume(volume, folder / f"ct{ext}")
        seconds[ext] = time.perf_counter() - start
    return seconds


def run_json(args: list[str]) -> dict:
    """Run ``python args...`` and parse the last line of its output as JSON."""
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"benchmark child failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=(600, 512, 512), metavar=("Z", "Y", "X"))
    parser.add_argument("--formats", nargs="+", default=[".nii.gz", ".nrrd", ".mha"])
    parser.add_argument("--write-into", type=Path, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    shape = tuple(args.shape)
    if args.write_into is not None:
        print(json.dumps(write_files(args.write_into, shape, args.formats)))
        return
    array_mb = 2 * shape[0] * shape[1] * shape[2] / 1e6
    rows = []
    with tempfile.TemporaryDirectory(prefix="medmamba-io-bench-") as folder:
        write_s = run_json([__file__, "--write-into", folder, "--shape", *map(str, shape), "--formats", *args.formats])
        for ext in args.formats:
            path = Path(folder) / f"ct{ext}"
            report = run_json(["-c", READ_CHILD, str(path)])
            peak_mb = report["peak_kib"] * 1024 / 1e6
            rows.append(
                f"| {ext} | {array_mb:.0f} | {path.stat().st_size / 1e6:.0f} | {write_s[ext]:.1f} | "
                f"{report['seconds']:.2f} | {peak_mb:.0f} | {peak_mb / array_mb:.2f} |"
            )
    print(f"shape (z, y, x) {shape}, int16\n")
    print("| format | array MB | file MB | write s | read s | peak RSS MB | ratio to array |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
