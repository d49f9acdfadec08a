"""Segmentation quality of a registered model on labelled cases, through the real inference engine.

Prints per-case and summary rows (per-class Dice, HD95 in mm, inference seconds) as markdown.

    python benchmarks/quality.py --model lightm_unet_3d --data ../shared/data/msd_hippocampus \
        --split weights/splits/msd_hippocampus.json --device cpu [--mode accurate] [--json out.json] \
        [--postprocess none recommended largest]

Each case is segmented once (timed, no clean-up); each ``--postprocess`` choice is then applied to those labels
(what ``segment(postprocess=...)`` does as its last step) and scored, one table per choice.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from napari_medmamba.inference import (  # noqa: E402
    POSTPROCESS_CHOICES, apply_postprocess, describe_postprocess, postprocess_for, segment)
from napari_medmamba.inference.engine import resolve_model  # noqa: E402
from napari_medmamba.io import read_volume  # noqa: E402
from napari_medmamba.training.dataset import load_case_folder  # noqa: E402


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks (1.0 when both are empty)."""
    total = pred.sum() + ref.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(pred, ref).sum() / total)


def hd95(pred: np.ndarray, ref: np.ndarray, spacing_zyx: tuple[float, float, float]) -> float:
    """95th percentile symmetric surface distance in mm (nan when one mask is empty)."""
    if not pred.any() or not ref.any():
        return float("nan")

    def surface(mask: np.ndarray) -> np.ndarray:
        return mask & ~ndimage.binary_erosion(mask)

    sp, sr = surface(pred), surface(ref)
    to_ref = ndimage.distance_transform_edt(~sr, sampling=spacing_zyx)[sp]
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing_zyx)[sr]
    return float(np.percentile(np.concatenate([to_ref, to_pred]), 95))


def bootstrap_ci(values: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean."""
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(n, len(values)), replace=True).mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def select_cases(data: Path, split: Path | None, limit: int | None) -> list:
    """The labelled cases of ``data`` (MSD or nnU-Net raw layout), only the split's 'val' ids when ``split``
    names a JSON file, at most ``limit``."""
    cases = load_case_folder(data)
    if split:
        val = set(json.loads(split.read_text())["val"])
        cases = [c for c in cases if c.case_id in val]
    return cases[:limit] if limit else cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lightm_unet_3d")
    parser.add_argument("--data", type=Path, required=True, help="folder of image/label pairs (MSD or nnU-Net raw layout)")
    parser.add_argument("--split", type=Path, help="JSON with a 'val' list of case ids; default: every case")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mode", default="accurate", choices=["accurate", "fast"])
    parser.add_argument("--limit", type=int, help="evaluate only the first N cases")
    parser.add_argument("--mirror", action="store_true",
                        help="test-time mirroring along the model's mirror_axes (segment(mirror=True))")
    parser.add_argument("--json", type=Path, help="also write results as JSON")
    parser.add_argument("--weights", type=Path,
                        help="evaluate these weights (safetensors) in the registered model's network and contract "
                             "instead of its shipped ones, e.g. a baseline or a new training run")
    parser.add_argument("--postprocess", choices=POSTPROCESS_CHOICES, nargs="+", default=["none"],
                        help="clean-ups to score, as in the CLI: none, recommended (the model's own, e.g. largest "
                             "component of some organs), largest (largest component of every class); several give "
                             "one table each from the same segmentations (default: none)")
    parser.add_argument("--largest-component", dest="postprocess", action="store_const", const=["largest"],
                        help="same as --postprocess largest")
    args = parser.parse_args()

    cases = select_cases(args.data, args.split, args.limit)
    if args.weights:
        from napari_medmamba.models import get_model_spec, load_checkpoint

        net, contract = load_checkpoint(args.weights, name=args.model), get_model_spec(args.model).contract
        name, warnings = f"{args.model} ({args.weights.name})", []
    else:
        net, contract, name, warnings = resolve_model(args.model)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    model = (net, contract, name)
    classes = contract.label_names[1:]
    posts = {choice: postprocess_for(choice, model) for choice in dict.fromkeys(args.postprocess)}
    rows: dict[str, list[dict]] = {choice: [] for choice in posts}
    for i, case in enumerate(cases):
        case_id = case.case_id
        volume, ref = read_volume(case.image_path), np.rint(read_volume(case.label_path).array).astype(np.int64)
        def run() -> np.ndarray:
            return segment(volume, model, device=args.device, mode=args.mode, return_probabilities=False,
                           mirror=args.mirror).labels.array

        if i == 0:  # warm-up (kernel compilation, allocator) on the first case only
            run()
        start = time.perf_counter()
        raw = run()
        seconds = time.perf_counter() - start
        for choice, post in posts.items():
            t0 = time.perf_counter()
            pred = raw if post is None else apply_postprocess(raw, post, volume.geometry.voxel_volume_ml)
            row = {"case": case_id, "seconds": seconds, "postprocess_seconds": time.perf_counter() - t0,
                   "shape": list(volume.shape)}
            for value, cls in enumerate(classes, start=1):
                if case.labelled is not None and value not in case.labelled:  # partial labels: not scored
                    row[f"dice {cls}"] = row[f"hd95 {cls}"] = float("nan")
                    continue
                row[f"dice {cls}"] = dice(pred == value, ref == value)
                row[f"hd95 {cls}"] = hd95(pred == value, ref == value, volume.geometry.spacing_zyx)
            rows[choice].append(row)
            print(f"{case_id} [{choice}]: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float)),
                  file=sys.stderr)
        if args.json:  # keep partial results
            args.json.write_text(json.dumps(rows if len(rows) > 1 else rows[args.postprocess[0]], indent=1))
    for choice, post in posts.items():
        print_summary(rows[choice], classes, f"{name} on {len(rows[choice])} cases of {args.data.name} ({args.mode}, "
                      + ("mirrored, " if args.mirror else "")
                      + f"{args.device}; clean-up: {describe_postprocess(post, contract.label_names)}; the first case is "
                      "segmented once more before it is timed (warm-up); classes a case did not contour are not scored)")


def print_summary(rows: list[dict], classes: tuple[str, ...], title: str) -> None:
    """Per-class Dice and HD95 with 95% bootstrap intervals, and time per case, as a markdown table."""
    print(f"\n{title}\n")
    print("| class | Dice mean [95% CI] | HD95 mm mean [95% CI] (median) | inference s/case median (max) |")
    print("|---|---|---|---|")
    secs = np.array([r["seconds"] for r in rows])
    for cls in classes:
        d = np.array([r[f"dice {cls}"] for r in rows])
        h = np.array([r[f"hd95 {cls}"] for r in rows])
        d, hf = d[~np.isnan(d)], h[np.isfinite(h)]
        lo, hi = bootstrap_ci(d)
        hlo, hhi = bootstrap_ci(hf) if hf.size else (float("nan"), float("nan"))
        hd = f"{hf.mean():.2f} [{hlo:.2f}, {hhi:.2f}] ({np.median(hf):.2f})" if hf.size else "n/a"
        print(f"| {cls} (n={d.size}) | {d.mean():.4f} [{lo:.4f}, {hi:.4f}] | {hd} | "
              f"{np.median(secs):.2f} ({secs.max():.2f}) |")
    mean_fg = np.nanmean([[r[f"dice {c}"] for c in classes] for r in rows], axis=1)
    lo, hi = bootstrap_ci(mean_fg)
    print(f"| mean foreground | {mean_fg.mean():.4f} [{lo:.4f}, {hi:.4f}] | | |")


if __name__ == "__main__":
    main()
