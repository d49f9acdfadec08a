"""CPU inference of two checkouts of napari-medmamba on the same cases, interleaved: was a code change faster?

    git worktree add /tmp/base HEAD~1
    python benchmarks/engine_ab.py --base /tmp/base --head . --model lightm_unet_3d_hn_oar \
        --data ../shared/data/openkbp --split weights/splits/openkbp_oar.json [--limit N] [--json out.json]

One worker process per checkout imports that checkout's package (its folder first on ``sys.path``) and keeps
its model, kernels and allocator warm. Each case is segmented by ``segment()`` on the CPU in both workers, one
after the other, in alternating order from case to case, so that this machine's drift (up to 50% between runs)
hits both alike. Prints seconds per case of both, the head / base time ratio per case (median and range), and
the fraction of voxels whose label agrees; Dice is ``benchmarks/quality.py``'s business.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def worker(checkout: str, model_name: str) -> None:
    """Serve JSON requests {"image": path, "out": path} from stdin: segment, save the labels, reply the seconds."""
    sys.path.insert(0, str(Path(checkout).resolve()))
    import time

    import napari_medmamba
    from napari_medmamba.inference import segment
    from napari_medmamba.inference.engine import resolve_model
    from napari_medmamba.io import read_volume

    net, contract, name, _ = resolve_model(model_name)
    print(json.dumps({"package": napari_medmamba.__file__}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        volume = read_volume(request["image"])
        if request.get("warm_up"):
            segment(volume, (net, contract, name), device="cpu")
        t0 = time.perf_counter()
        labels = segment(volume, (net, contract, name), device="cpu", return_probabilities=False).labels.array
        seconds = time.perf_counter() - t0
        np.save(request["out"], labels)
        print(json.dumps({"seconds": seconds}), flush=True)


class Worker:
    """A worker process for one checkout."""

    def __init__(self, checkout: Path, model_name: str) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", str(checkout), "--model", model_name],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.package = self._reply()["package"]

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited with {self.proc.wait()}")
        return json.loads(line)

    def segment(self, image: Path, out: Path, warm_up: bool) -> float:
        self.proc.stdin.write(json.dumps({"image": str(image), "out": str(out), "warm_up": warm_up}) + "\n")
        self.proc.stdin.flush()
        return self._reply()["seconds"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def run(base: Path, head: Path, model_name: str, data: Path, split: Path | None, limit: int | None) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from quality import select_cases

    cases = select_cases(data, split, limit)
    workers = {"base": Worker(base, model_name), "head": Worker(head, model_name)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for i, case in enumerate(cases):
                order = ["base", "head"] if i % 2 == 0 else ["head", "base"]
                row = {"case": case.case_id}
                for side in order:
                    row[f"seconds {side}"] = workers[side].segment(case.image_path, Path(tmp) / f"{side}.npy", i == 0)
                row["ratio"] = row["seconds head"] / row["seconds base"]
                row["label agreement"] = float((np.load(Path(tmp) / "base.npy") == np.load(Path(tmp) / "head.npy")).mean())
                rows.append(row)
                print(f"{case.case_id}: base {row['seconds base']:.2f} s, head {row['seconds head']:.2f} s, "
                      f"ratio {row['ratio']:.3f}, agreement {row['label agreement']:.6f}", file=sys.stderr)
        finally:
            for w in workers.values():
                w.close()
    return {"model": model_name, "base": workers["base"].package, "head": workers["head"].package, "rows": rows}


def summary(result: dict, limit_s: float | None) -> str:
    rows = result["rows"]
    sec = {side: [r[f"seconds {side}"] for r in rows] for side in ("base", "head")}
    ratios = [r["ratio"] for r in rows]
    lines = [f"base: {result['base']}", f"head: {result['head']}", "",
             "| | base | head |", "|---|---|---|",
             "| seconds per case, median (max) | " + " | ".join(
                 f"{statistics.median(sec[s]):.2f} ({max(sec[s]):.2f})" for s in sec) + " |"]
    if limit_s:
        lines.append(f"| cases under {limit_s:g} s | " + " | ".join(
            f"{sum(t < limit_s for t in sec[s])} of {len(rows)}" for s in sec) + " |")
    lines += ["", f"head / base time per case: median {statistics.median(ratios):.3f}, "
                  f"range {min(ratios):.3f}-{max(ratios):.3f}",
              f"label agreement, lowest case: {min(r['label agreement'] for r in rows):.6f}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", type=Path, help="checkout whose package is the baseline")
    p.add_argument("--head", type=Path, help="checkout whose package is compared with it")
    p.add_argument("--model", default="lightm_unet_3d_hn_oar")
    p.add_argument("--data", type=Path)
    p.add_argument("--split", type=Path, default=None, help="JSON with a 'val' list of case ids")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--target-seconds", type=float, default=5.0, help="count cases under this time (0: off)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a.worker, a.model)
        return 0
    if not (a.base and a.head and a.data):
        p.error("--base, --head and --data are required")
    result = run(a.base, a.head, a.model, a.data, a.split, a.limit)
    print(f"{result['model']}, {len(result['rows'])} cases, CPU, interleaved\n")
    print(summary(result, a.target_seconds or None))
    if a.json:
        a.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
