"""CPU inference with float32 against bfloat16 projections (``MEDMAMBA_CPU_BF16``), case by case, same run.

    python benchmarks/cpu_bf16_ab.py --model lightm_unet_3d_hn_oar --data ../shared/data/openkbp \
        --split weights/splits/openkbp_oar.json [--limit N] [--json out.json]

Each case is segmented by ``segment()`` on the CPU twice, back to back, once with the Mamba layers' piece-path
projections as float32 products (``MEDMAMBA_CPU_BF16=0``) and once as bfloat16 products, in alternating order
from case to case (so that the machine's drift hits both alike). Prints per-class Dice of both, the seconds
of both, and the fraction of voxels whose label agrees; classes a case did not contour are not scored. On a
CPU without native bf16 products both runs are float32 (the script says so).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from quality import dice, select_cases  # noqa: E402

from napari_medmamba.inference import segment  # noqa: E402
from napari_medmamba.inference.engine import resolve_model  # noqa: E402
from napari_medmamba.io import read_volume  # noqa: E402
from napari_medmamba.models import mamba  # noqa: E402
from napari_medmamba.models.mamba import CPU_BF16_ENV  # noqa: E402

PRECISIONS = {"fp32": "0", "bf16": "1"}


def run(model_name: str, data: Path, split: Path | None, limit: int | None) -> dict:
    cases = select_cases(data, split, limit)
    previous = os.environ.get(CPU_BF16_ENV)
    net, contract, name, _ = resolve_model(model_name)
    model = (net, contract, name)
    classes = contract.label_names[1:]
    rows = []
    for i, case in enumerate(cases):
        volume = read_volume(case.image_path)
        ref = np.rint(read_volume(case.label_path).array).astype(np.int64)
        order = list(PRECISIONS) if i % 2 == 0 else list(PRECISIONS)[::-1]
        labels, row = {}, {"case": case.case_id}
        for precision in order:
            os.environ[CPU_BF16_ENV] = PRECISIONS[precision]
            if i == 0:  # warm-up: kernel compilation, allocator
                segment(volume, model, device="cpu")
            t0 = time.perf_counter()
            labels[precision] = segment(volume, model, device="cpu").labels.array
            row[f"seconds {precision}"] = time.perf_counter() - t0
        for precision, pred in labels.items():
            for value, cls in enumerate(classes, start=1):
                scored = case.labelled is None or value in case.labelled
                row[f"dice {cls} {precision}"] = dice(pred == value, ref == value) if scored else float("nan")
        row["label agreement"] = float((labels["fp32"] == labels["bf16"]).mean())
        rows.append(row)
        print(f"{case.case_id}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float)),
              file=sys.stderr)
    if previous is None:
        os.environ.pop(CPU_BF16_ENV, None)
    else:
        os.environ[CPU_BF16_ENV] = previous
    return {"model": name, "classes": list(classes), "rows": rows}


def summary(result: dict) -> str:
    rows, lines = result["rows"], []
    lines.append("| class | Dice fp32 | Dice bf16 | bf16 - fp32 |")
    lines.append("|---|---|---|---|")
    means = {p: [] for p in PRECISIONS}
    for cls in result["classes"]:
        m = {p: float(np.nanmean([r[f"dice {cls} {p}"] for r in rows])) for p in PRECISIONS}
        for p in PRECISIONS:
            means[p].append(m[p])
        lines.append(f"| {cls} | {m['fp32']:.4f} | {m['bf16']:.4f} | {m['bf16'] - m['fp32']:+.4f} |")
    mf, mb = float(np.nanmean(means["fp32"])), float(np.nanmean(means["bf16"]))
    lines.append(f"| mean over classes | {mf:.4f} | {mb:.4f} | {mb - mf:+.4f} |")
    sec = {p: [r[f"seconds {p}"] for r in rows] for p in PRECISIONS}
    lines.append("")
    lines.append("| | fp32 | bf16 |")
    lines.append("|---|---|---|")
    lines.append("| seconds per case, median (max) | " + " | ".join(
        f"{statistics.median(sec[p]):.2f} ({max(sec[p]):.2f})" for p in PRECISIONS) + " |")
    lines.append("| cases under 5 s | " + " | ".join(f"{sum(s < 5 for s in sec[p])} of {len(rows)}" for p in PRECISIONS)
                 + " |")
    lines.append(f"| label agreement, lowest case | {min(r['label agreement'] for r in rows):.5f} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="lightm_unet_3d_hn_oar")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--split", type=Path, default=None, help="JSON with a 'val' list of case ids")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    native = mamba.cpu_multiplies_bf16()
    if not native:
        print("this CPU has no native bf16 products: both runs use float32 projections", file=sys.stderr)
    result = run(a.model, a.data, a.split, a.limit)
    result["native_bf16"] = native
    print(f"{result['model']}, {len(result['rows'])} cases, CPU, native bf16 products: {native}\n")
    print(summary(result))
    if a.json:
        a.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
