"""Simulated-user fine-tuning benchmark (issue #9): correct the k worst slices, fine-tune, re-segment.

Part 1, domain shift ("shift"): validation hippocampus cases (never trained on) are passed through
:func:`scanner_shift`, a deterministic simulated "other scanner" (thick slices, smooth bias field, gamma, noise).
A simulated user segments each corrected case with the base model through the inference engine, replaces the
k axial slices with the lowest per-slice Dice by the ground truth and marks them reviewed in an EditLog; the
model is fine-tuned on those slices (``finetune``), and Dice is measured on the UNTOUCHED slices of the corrected
cases and on OTHER shifted cases never corrected (same scanner), before and after, per k and mode.

Part 2, few-shot new structure ("newstruct"): on the TotalSegmentator example CT (cropped around the structure,
see :func:`load_ct_structure`), a structure the base model never saw (default: spleen) is labelled on k axial
slices; ``finetune(new_labels=[...])`` widens the classification layer and learns it; Dice of the new class is
measured on the untouched slices.

Part 3, a second clinic's contouring style ("clinic", issue #13): base ``lightm_unet_3d_hn_oar`` (shipped weights)
on the OpenKBP validation cases (``weights/splits/openkbp_oar.json``) that have both parotids contoured. The clinic
contours the parotids with a wider margin: :func:`grow_labels` grows both by ``--margin-mm`` (default 4 mm,
isotropic, in mm through the case's voxel spacing; grown voxels only take background), everything else as the
reference. The user corrects, on ``--clinic-cases`` cases, the k axial slices where the base prediction and the
clinic's parotids disagree on the most voxels; after ``finetune``, Dice to the clinic style per organ (parotids:
the style change; the other organs must not get worse) and the mean parotid volume (mL) are measured on the
untouched slices and on ``--clinic-other`` never-corrected cases, before and after.

    python benchmarks/finetune.py --device cuda --parts clinic --k 1 3 5 10 --budget-s 20 --out results/ft_clinic
    python benchmarks/finetune.py --device cpu --cases 2 --other 4 --k 5 10 --modes decoder --out results/ft
    python benchmarks/finetune.py --quick --out /tmp/ft          # smoke run, ~1-2 min on 2 CPU cores

Writes ``finetune.json`` (every number; ``--json`` overrides the path) and, with ``--plot``, a PNG (matplotlib is
imported only then) into ``--out``; prints markdown tables to stdout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

from typing import Sequence

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from napari_medmamba.annotation.edit_log import EditLog  # noqa: E402
from napari_medmamba.inference import segment  # noqa: E402
from napari_medmamba.inference.engine import resolve_model  # noqa: E402
from napari_medmamba.io import read_volume  # noqa: E402
from napari_medmamba.io.volume import Volume  # noqa: E402
from napari_medmamba.models import REGISTRY, ModelSpec, get_model_spec  # noqa: E402
from napari_medmamba.training.dataset import load_case_folder  # noqa: E402
from napari_medmamba.training.finetune import CorrectionExample, finetune  # noqa: E402

DATA = Path(os.environ.get("MEDMAMBA_SHARED_DATA") or ROOT.parent / "shared" / "data")
"""The shared data folder; ``MEDMAMBA_SHARED_DATA`` overrides the default ``../shared/data``."""
HIPPO = DATA / "msd_hippocampus"
SPLIT = ROOT / "weights" / "splits" / "msd_hippocampus.json"
CT = DATA / "totalseg" / "example_ct_sm.nii.gz"
CT_SEG = DATA / "totalseg" / "example_seg.nii.gz"
STRUCTURES = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5}
"""TotalSegmentator v2 class ids (``example_seg.nii.gz``) of the structures offered for part 2."""
OPENKBP = DATA / "openkbp"
OPENKBP_SPLIT = ROOT / "weights" / "splits" / "openkbp_oar.json"
PAROTIDS = (3, 4)
"""Label values of the right and left parotid (OpenKBP, ``lightm_unet_3d_hn_oar``)."""


# ---- the simulated scanner -------------------------------------------------------------------------

def scanner_shift(array: np.ndarray, strength: float = 1.0, scanner_seed: int = 0, case_seed: int = 0) -> np.ndarray:
    """A deterministic "other scanner" version of an MR volume (z, y, x); ``strength`` 0 only rescales.

    1. intensities robustly rescaled to [0, 1] (0.5 / 99.5 percentiles, clipped);
    2. thick slices: Gaussian blur along z (sigma = f / 2 voxels), every f-th slice kept and linearly
       interpolated back to the original grid, f = 1 + 2 * strength (3 mm slices from 1 mm at strength 1);
    3. smooth multiplicative bias field exp(0.4 * strength * B), B a second-order polynomial in normalised
       coordinates (coefficients from ``scanner_seed``: the same field shape for every case of the scanner),
       scaled to max |B| = 1 (+-40 % at strength 1);
    4. gamma I ** (1 + 0.8 * strength) (1.8 at strength 1: a different grey/white contrast);
    5. additive Gaussian noise, sigma 0.03 * strength (of the [0, 1] range), seeded by ``case_seed``.
    """
    a = np.asarray(array, dtype=np.float64)
    lo, hi = np.percentile(a, [0.5, 99.5])
    a = np.clip((a - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    if strength <= 0:
        return a.astype(np.float32)
    f = 1.0 + 2.0 * strength
    n = a.shape[0]
    a = ndimage.gaussian_filter1d(a, sigma=0.5 * f, axis=0, mode="nearest")
    yy, xx = np.arange(a.shape[1]), np.arange(a.shape[2])
    thick = ndimage.map_coordinates(a, np.meshgrid(np.arange(0, n - 1 + 1e-9, f), yy, xx, indexing="ij"), order=1)
    back = np.minimum(np.arange(n) / f, thick.shape[0] - 1)
    a = ndimage.map_coordinates(thick, np.meshgrid(back, yy, xx, indexing="ij"), order=1, mode="nearest")
    c = np.random.default_rng(scanner_seed).normal(size=9)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in a.shape], indexing="ij")
    field = c[0] * x + c[1] * y + c[2] * z + c[3] * x * y + c[4] * y * z + c[5] * x * z + c[6] * x * x \
        + c[7] * y * y + c[8] * z * z
    field -= field.mean()
    a = a * np.exp(0.4 * strength * field / max(np.abs(field).max(), 1e-9))
    a = np.clip(a, 0.0, None) ** (1.0 + 0.8 * strength)
    a = a + np.random.default_rng(case_seed).normal(scale=0.03 * strength, size=a.shape)
    return a.astype(np.float32)


# ---- metrics ---------------------------------------------------------------------------------------------

def class_dice(pred: np.ndarray, ref: np.ndarray, classes, mask: np.ndarray | None = None) -> dict[int, float]:
    """Hard Dice per class over the voxels in ``mask`` (all when None); NaN for a class absent from both."""
    if mask is not None:
        pred, ref = pred[mask], ref[mask]
    out = {}
    for c in classes:
        p, r = pred == c, ref == c
        total = int(p.sum()) + int(r.sum())
        out[int(c)] = 2.0 * int((p & r).sum()) / total if total else float("nan")
    return out


def mean_dice(pred, ref, classes, mask=None) -> float:
    d = [v for v in class_dice(pred, ref, classes, mask).values() if np.isfinite(v)]
    return float(np.mean(d)) if d else float("nan")


def worst_slices(pred: np.ndarray, ref: np.ndarray, classes, k: int, by: str = "dice") -> list[int]:
    """The k axial (axis 0) slices the prediction gets most wrong, sorted by index.

    ``by="dice"``: the lowest mean-class Dice, among slices with ground-truth foreground of ``classes``;
    ``by="voxels"``: the most voxels labelled differently among those that are one of ``classes`` in either map,
    among slices where either map has ``classes`` (ties: the lower index)."""
    if by == "voxels":
        involved = np.isin(pred, classes) | np.isin(ref, classes)
        errors = (involved & (pred != ref)).sum(axis=(1, 2))
        zs = np.flatnonzero(involved.any(axis=(1, 2)))
        return sorted(int(z) for z in sorted(zs, key=lambda z: (-int(errors[z]), int(z)))[:k])
    if by != "dice":
        raise ValueError(f"by must be 'dice' or 'voxels', got {by!r}")
    zs = np.flatnonzero(np.isin(ref, classes).any(axis=(1, 2)))
    scores = [(mean_dice(pred[z], ref[z], classes), int(z)) for z in zs]
    scores.sort(key=lambda t: (np.nan_to_num(t[0], nan=1.0), t[1]))
    return sorted(z for _, z in scores[:k])


def spread_slices(ref_mask: np.ndarray, k: int) -> list[int]:
    """k axial slices evenly spread over the slices where the structure is (what a user labels first)."""
    zs = np.flatnonzero(ref_mask.any(axis=(1, 2)))
    if k >= zs.size:
        return [int(z) for z in zs]
    return sorted({int(zs[int(round(q))]) for q in np.linspace(0, zs.size - 1, k + 2)[1:-1]})


def untouched(shape, slices) -> np.ndarray:
    m = np.ones(shape, bool)
    m[list(slices)] = False
    return m


# ---- data ------------------------------------------------------------------------------------------------

def case_seed(case_id: str) -> int:
    digits = "".join(ch for ch in case_id if ch.isdigit())
    return int(digits) if digits else 0


def load_shifted(n_cases: int, strength: float, scanner_seed: int, with_clean: bool):
    cases = load_case_folder(HIPPO)
    val = json.loads(SPLIT.read_text())["val"]
    by_id = {c.case_id: c for c in cases}
    out = []
    for cid in val[:n_cases]:
        image_path, label_path = by_id[cid].image_path, by_id[cid].label_path
        volume = read_volume(image_path)
        ref = read_volume(label_path).array.astype(np.int64)
        shifted = Volume(scanner_shift(volume.array, strength, scanner_seed, case_seed(cid)), volume.geometry)
        out.append({"id": cid, "volume": shifted, "clean": volume if with_clean else None, "ref": ref})
    return out


def load_ct_structure(structure: str, margin: int, n_slices: int = 0) -> tuple[Volume, np.ndarray]:
    """The example CT and a binary map of ``structure``, cropped in-plane to the structure's bounding box
    plus ``margin`` voxels (and, with ``n_slices``, to that many axial slices around the structure's middle),
    so that CPU runs stay short; the crop keeps the CT's geometry."""
    volume, seg = read_volume(CT), read_volume(CT_SEG).array.astype(np.int64)
    mask = seg == STRUCTURES[structure]
    zs, ys, xs = np.nonzero(mask)
    z0, z1 = 0, mask.shape[0]
    if n_slices:
        mid = (int(zs.min()) + int(zs.max())) // 2
        z0 = max(0, min(mid - n_slices // 2, mask.shape[0] - n_slices))
        z1 = min(mask.shape[0], z0 + n_slices)
    y0, y1 = max(0, ys.min() - margin), min(mask.shape[1], ys.max() + margin + 1)
    x0, x1 = max(0, xs.min() - margin), min(mask.shape[2], xs.max() + margin + 1)
    return volume.crop((z0, y0, x0), (z1, y1, x1)), mask[z0:z1, y0:y1, x0:x1]


# ---- the runs --------------------------------------------------------------------------------------------

def seg(volume, model, device) -> tuple[np.ndarray, float]:
    t = time.perf_counter()
    labels = segment(volume, model, device=device, return_probabilities=False).labels.array
    return labels.astype(np.int64), time.perf_counter() - t


def ft_kwargs(args) -> dict:
    kw = {"budget_s": args.budget_s, "max_steps": args.max_steps, "device": args.device, "seed": args.seed}
    if args.patch:
        kw["patch_size"] = tuple(args.patch)
    if args.lr:
        kw["lr"] = args.lr
    if args.patience:
        kw["patience"] = args.patience
    return kw


def _evals(res) -> list[list[float]]:
    """[step, held-back mean Dice] of each evaluation during fine-tuning."""
    return [[h["step"], h["heldout_dice"]] for h in res.history if "heldout_dice" in h]


def _ft_stats(res) -> dict:
    """What every run row records about one ``finetune`` call."""
    return {"finetune_s": res.seconds, "lr": res.card["training"]["lr"], "patch": res.card["training"]["patch_size"],
            "steps": res.steps, "best_step": res.best_step, "stop_reason": res.stop_reason,
            "train_slices": res.train_slices, "heldout_slices": res.heldout_slices,
            "heldout_dice_before": res.dice_before.get("mean"), "heldout_dice_after": res.dice_after.get("mean"),
            "device": res.card["training"]["device"], "evals": _evals(res)}


def run_shift(args) -> dict:
    net, contract, name, _ = resolve_model(args.shift_base)
    base = (net, contract, name)
    classes = list(range(1, contract.num_classes))
    data = load_shifted(args.cases + args.other, args.strength, args.scanner_seed, with_clean=not args.quick)
    corrected, other = data[: args.cases], data[args.cases:]
    for c in data:
        c["pred"], c["seg_s"] = seg(c["volume"], base, args.device)
        c["dice_shifted"] = mean_dice(c["pred"], c["ref"], classes)
        if c["clean"] is not None:
            c["dice_clean"] = mean_dice(seg(c["clean"], base, args.device)[0], c["ref"], classes)
        print(f"  base {c['id']}: Dice shifted {c['dice_shifted']:.3f}"
              + (f" (clean {c['dice_clean']:.3f})" if "dice_clean" in c else "")
              + f", {c['seg_s']:.1f} s", file=sys.stderr, flush=True)
    runs = []
    for k in args.k:
        examples, touched = [], []
        for c in corrected:
            zs = worst_slices(c["pred"], c["ref"], classes, k)
            labels = c["pred"].copy()
            log = EditLog(labels.shape)
            for z in zs:
                labels[z] = c["ref"][z]
                log.accept_slice(0, z)
            examples.append(CorrectionExample(c["volume"], labels, log))
            touched.append(zs)
        for mode in args.modes:
            res = finetune(args.shift_base, examples, mode=mode, **ft_kwargs(args))
            model = (res.model, res.spec.contract, res.spec.name)
            row = {"k": k, "mode": mode, "slices": touched, **_ft_stats(res), "corrected": [], "other": []}
            seg_s = []
            for c, zs in zip(corrected, touched):
                pred, s = seg(c["volume"], model, args.device)
                seg_s.append(s)
                m = untouched(c["ref"].shape, zs)
                row["corrected"].append({"id": c["id"], "before": mean_dice(c["pred"], c["ref"], classes, m),
                                         "after": mean_dice(pred, c["ref"], classes, m)})
            for c in other:
                pred, s = seg(c["volume"], model, args.device)
                seg_s.append(s)
                row["other"].append({"id": c["id"], "before": c["dice_shifted"],
                                     "after": mean_dice(pred, c["ref"], classes)})
            for part in ("corrected", "other"):
                for when in ("before", "after"):
                    v = [r[when] for r in row[part]]
                    row[f"{part}_{when}"] = float(np.mean(v)) if v else float("nan")
            row["segment_s_mean"] = float(np.mean(seg_s))
            runs.append(row)
            print(f"  k={k} {mode}: untouched {row['corrected_before']:.3f} -> {row['corrected_after']:.3f}, "
                  f"other {row['other_before']:.3f} -> {row['other_after']:.3f}, {res.seconds:.1f} s, "
                  f"{res.steps} steps ({res.stop_reason}, best {res.best_step})", file=sys.stderr, flush=True)
    return {"base": name, "strength": args.strength, "scanner_seed": args.scanner_seed,
            "cases": [{"id": c["id"], "role": "corrected" if i < args.cases else "other",
                       "base_dice_shifted": c["dice_shifted"], "base_dice_clean": c.get("dice_clean"),
                       "base_segment_s": c["seg_s"]} for i, c in enumerate(data)],
            "runs": runs}


def run_newstruct(args) -> dict:
    volume, mask = load_ct_structure(args.structure, args.ct_margin, args.ct_slices)
    ref = mask.astype(np.int64)
    base_classes = resolve_model(args.base)[1].num_classes
    runs = []
    for k in args.k:
        zs = spread_slices(mask, k)
        for mode in args.modes:
            res = finetune(args.base, [_ct_example(volume, mask, zs, base_classes)], mode=mode,
                           new_labels=[args.structure], **ft_kwargs(args))
            new = res.spec.contract.num_classes - 1
            pred, s = seg(volume, (res.model, res.spec.contract, res.spec.name), args.device)
            m = untouched(mask.shape, zs)
            after = class_dice(pred == new, ref == 1, [1], m)[1]
            row = {"k": k, "mode": mode, "slices": zs, "before": 0.0, "after": after, "finetune_s": res.seconds,
                   "lr": res.card["training"]["lr"], "patch": res.card["training"]["patch_size"],
                   "segment_s": s, "steps": res.steps, "best_step": res.best_step, "stop_reason": res.stop_reason,
                   "heldout_dice_before": res.dice_before.get(args.structure),
                   "heldout_dice_after": res.dice_after.get(args.structure),
                   "device": res.card["training"]["device"], "evals": _evals(res),
                   "labels": list(res.spec.contract.label_names)}
            runs.append(row)
            print(f"  new structure k={k} {mode}: {args.structure} Dice on untouched slices {after:.3f}, "
                  f"{res.seconds:.1f} s, {res.steps} steps ({res.stop_reason})", file=sys.stderr, flush=True)
    return {"base": args.base, "structure": args.structure, "label_id": STRUCTURES[args.structure],
            "crop_shape": list(volume.shape), "spacing_zyx_mm": list(volume.geometry.spacing_zyx),
            "ct_margin": args.ct_margin, "ct_slices": args.ct_slices, "runs": runs,
            "note": "'before' is 0: the base model has no output for the structure"}


def _ct_example(volume: Volume, mask: np.ndarray, slices, base_classes: int) -> CorrectionExample:
    labels = np.where(mask, base_classes, 0).astype(np.int64)  # the new class comes after the base's classes
    log = EditLog(labels.shape)
    for z in slices:
        log.accept_slice(0, int(z))
    return CorrectionExample(volume, labels, log)


# ---- part 3: a second clinic's contouring style (issue #13) -------------------------------------------------

def grow_labels(labels: np.ndarray, spacing_zyx: Sequence[float], margin_mm: float,
                grow: Sequence[int] = PAROTIDS) -> np.ndarray:
    """A copy of ``labels`` (z, y, x) with the classes in ``grow`` dilated by ``margin_mm``.

    Isotropic in millimetres: a background voxel whose centre lies within ``margin_mm`` (Euclidean, through
    ``spacing_zyx``) of a voxel of a grown class takes that class (the nearer one when two are in reach, the lower
    label on a tie). Grown voxels only take background (0), never another organ; nothing else changes."""
    labels = np.asarray(labels)
    out = labels.copy()
    present = [int(c) for c in grow if (labels == c).any()]
    if margin_mm <= 0 or not present:
        return out
    dist = np.stack([ndimage.distance_transform_edt(labels != c, sampling=tuple(float(s) for s in spacing_zyx))
                     for c in present])
    reach = (dist.min(axis=0) <= margin_mm + 1e-6) & (labels == 0)
    out[reach] = np.asarray(present, dtype=labels.dtype)[np.argmin(dist, axis=0)[reach]]
    return out


def clinic_case(case_id: str, volume: Volume, ref: np.ndarray, labelled: Sequence[int], margin_mm: float) -> dict:
    """One case of the clinic part: the scan, the reference labels, the clinic style (parotids grown by
    ``margin_mm``), the contoured label values (partial labels) and the voxel volume in mL."""
    ref = np.asarray(ref).astype(np.int64)
    return {"id": case_id, "volume": volume, "ref": ref, "clinic": grow_labels(ref, volume.spacing_zyx, margin_mm),
            "labelled": tuple(int(v) for v in labelled if v), "voxel_ml": volume.geometry.voxel_volume_ml}


def clinic_case_ids(n_user: int, n_other: int, margin_mm: float = 4.0) -> tuple[list[str], list[str]]:
    """(user, other) OpenKBP validation case ids with both parotids contoured.

    User cases first: those whose in-plane voxel size is at most ``margin_mm`` (otherwise the margin grows the
    parotids along z only, and the corrections cannot show the in-plane part of the style), then the most organs
    contoured (a corrected slice then leaves the fewest organs unlabelled), then split order. Other cases: the
    rest in split order (``n_other`` <= 0: all)."""
    by_id = {c.case_id: c for c in load_case_folder(OPENKBP)}
    in_plane = {}
    for line in (OPENKBP / "cases.tsv").read_text().splitlines()[1:]:
        cols = line.split("\t")
        if len(cols) > 1 and cols[0].strip():
            in_plane[cols[0].strip()] = max(float(v) for v in cols[1].split(",")[:2])
    val = json.loads(OPENKBP_SPLIT.read_text())["val"]
    eligible = [cid for cid in val if set(PAROTIDS) <= set(by_id[cid].labelled or PAROTIDS)]
    ranked = sorted(eligible, key=lambda cid: (in_plane.get(cid, 0.0) > margin_mm + 1e-6,
                                               -len(by_id[cid].labelled or range(99)), val.index(cid)))
    users = ranked[:n_user]
    others = [cid for cid in eligible if cid not in users]
    return users, others[:n_other] if n_other > 0 else others


def load_clinic_cases(ids: Sequence[str], margin_mm: float) -> list[dict]:
    """:func:`clinic_case` for OpenKBP cases ``ids`` (labelled values from ``cases.tsv``)."""
    by_id = {c.case_id: c for c in load_case_folder(OPENKBP)}
    out = []
    for cid in ids:
        case = by_id[cid]
        volume = read_volume(case.image_path)
        labelled = case.labelled or range(1, 8)
        out.append(clinic_case(cid, volume, read_volume(case.label_path).array, labelled, margin_mm))
    return out


def clinic_correction(case: dict, pred: np.ndarray, k: int) -> tuple[CorrectionExample, list[int]]:
    """The simulated clinic user on one case: the k axial slices with the most voxels where ``pred`` and the
    clinic-style parotids disagree (:func:`worst_slices`, ``by="voxels"``) get the clinic labels and are marked
    reviewed; on them, an organ the case did not contour keeps the prediction (the user has no contour for it);
    every other slice keeps ``pred`` (unsupervised)."""
    zs = worst_slices(pred, case["clinic"], PAROTIDS, k, by="voxels")
    labels = pred.copy()
    log = EditLog(labels.shape)
    uncontoured = ~np.isin(pred, (0,) + tuple(case["labelled"]))
    for z in zs:
        keep = uncontoured[z] & (case["clinic"][z] == 0)
        labels[z] = np.where(keep, pred[z], case["clinic"][z])
        log.accept_slice(0, z)
    return CorrectionExample(case["volume"], labels, log), zs


def _nanmean(values) -> float:
    v = [float(x) for x in values if x is not None and np.isfinite(x)]
    return float(np.mean(v)) if v else float("nan")


def organ_report(pred: np.ndarray, case: dict, mask: np.ndarray, names: Sequence[str]) -> dict:
    """Over ``mask``: Dice to the clinic style per contoured organ (NaN for organs the case did not contour),
    parotid Dice to the reference (original style) and predicted parotid volumes in mL."""
    d = class_dice(pred, case["clinic"], range(1, len(names)), mask)
    d_ref = class_dice(pred, case["ref"], PAROTIDS, mask)
    p = pred[mask]
    return {"dice": {names[c]: (v if c in case["labelled"] else float("nan")) for c, v in d.items()},
            "dice_reference": {names[c]: v for c, v in d_ref.items()},
            "ml": {names[c]: float((p == c).sum()) * case["voxel_ml"] for c in PAROTIDS}}


def _clinic_record(case: dict, before: np.ndarray, after: np.ndarray, mask: np.ndarray, names) -> dict:
    """Per-case before/after :func:`organ_report` plus the clinic-style and reference parotid volumes."""
    vol = {style: {names[c]: float((case[key][mask] == c).sum()) * case["voxel_ml"] for c in PAROTIDS}
           for style, key in (("clinic", "clinic"), ("reference", "ref"))}
    return {"id": case["id"], "before": organ_report(before, case, mask, names),
            "after": organ_report(after, case, mask, names), "ml_clinic": vol["clinic"], "ml_reference": vol["reference"]}


def clinic_summary(records: Sequence[dict], names: Sequence[str]) -> dict:
    """Means over cases (NaN-aware): per organ, 'parotids' (mean of the two), 'other organs' (mean of the other
    organs' means), parotid Dice to the reference style, mean parotid volume (mL, over cases and both sides)."""
    parotids = [names[c] for c in PAROTIDS]
    others = [n for i, n in enumerate(names) if i and i not in PAROTIDS]
    out: dict = {}
    for when in ("before", "after"):
        organ = {n: _nanmean(r[when]["dice"][n] for r in records) for n in names[1:]}
        out[f"dice_{when}"] = organ
        out[f"parotids_{when}"] = _nanmean(organ[n] for n in parotids)
        out[f"other_organs_{when}"] = _nanmean(organ[n] for n in others)
        out[f"parotids_reference_{when}"] = _nanmean(r[when]["dice_reference"][n] for r in records for n in parotids)
        out[f"parotid_ml_{when}"] = _nanmean(r[when]["ml"][n] for r in records for n in parotids)
    out["dice_change"] = {n: out["dice_after"][n] - out["dice_before"][n] for n in names[1:]}
    out["parotid_ml_clinic"] = _nanmean(r["ml_clinic"][n] for r in records for n in parotids)
    out["parotid_ml_reference"] = _nanmean(r["ml_reference"][n] for r in records for n in parotids)
    return out


def _model_tuple(spec: ModelSpec) -> tuple:
    """(net, contract, name) of ``spec`` with its shipped weights; an unregistered spec without weights is built
    by its factory (how ``finetune`` starts from it)."""
    if spec.weights or spec.name in REGISTRY:
        return tuple(resolve_model(spec)[:3])
    return spec.factory(), spec.contract, spec.name


def clinic_experiment(base: ModelSpec, users: Sequence[dict], others: Sequence[dict], args) -> dict:
    """The clinic part on prepared cases (:func:`clinic_case`): base segmentation, then per k the user's
    corrections on ``users``, one ``finetune`` per mode (``args.clinic_modes``), and before/after reports on the
    untouched slices of ``users`` and the whole of ``others``."""
    net, contract, name = _model_tuple(base)
    names = contract.label_names
    for c in (*users, *others):
        c["pred"], c["seg_s"] = seg(c["volume"], (net, contract, name), args.device)
        rep = organ_report(c["pred"], c, np.ones(c["ref"].shape, bool), names)
        c["base_parotids"] = _nanmean(rep["dice"][names[p]] for p in PAROTIDS)
        c["base_parotids_reference"] = _nanmean(rep["dice_reference"].values())
        print(f"  base {c['id']}: parotid Dice to the clinic style {c['base_parotids']:.3f} (reference style "
              f"{c['base_parotids_reference']:.3f}), {c['seg_s']:.1f} s", file=sys.stderr, flush=True)
    runs = []
    for k in args.k:
        corrections = [clinic_correction(c, c["pred"], k) for c in users]
        examples, touched = [e for e, _ in corrections], [zs for _, zs in corrections]
        for mode in args.clinic_modes:
            res = finetune(base, examples, mode=mode, **ft_kwargs(args))
            model = (res.model, res.spec.contract, res.spec.name)
            row = {"k": k, "mode": mode, "slices": touched, **_ft_stats(res)}
            seg_s, groups = [], {"user": [], "other": []}
            for group, cases in (("user", users), ("other", others)):
                for i, c in enumerate(cases):
                    pred, s = seg(c["volume"], model, args.device)
                    seg_s.append(s)
                    mask = untouched(c["ref"].shape, touched[i] if group == "user" else [])
                    groups[group].append(_clinic_record(c, c["pred"], pred, mask, names))
            for group, records in groups.items():
                row[group] = {**clinic_summary(records, names), "cases": records}
            row["segment_s_mean"] = _nanmean(seg_s)
            runs.append(row)
            u, o = row["user"], row["other"]
            print(f"  clinic k={k} {mode}: parotids untouched {_f(u['parotids_before'])} -> "
                  f"{_f(u['parotids_after'])}, other cases {_f(o['parotids_before'])} -> {_f(o['parotids_after'])}; "
                  f"other organs {_f(o['other_organs_before'])} -> {_f(o['other_organs_after'])}; parotid mL "
                  f"{_f(o['parotid_ml_before'])} -> {_f(o['parotid_ml_after'])} (clinic "
                  f"{_f(o['parotid_ml_clinic'])}), {res.seconds:.1f} s, {res.steps} steps ({res.stop_reason})",
                  file=sys.stderr, flush=True)
    return {"base": name, "margin_mm": args.margin_mm, "grown": [names[p] for p in PAROTIDS],
            "style": f"reference labels with {', '.join(names[p] for p in PAROTIDS)} grown by {args.margin_mm} mm "
                     "(Euclidean, voxel spacing; into background only); other organs unchanged",
            "labels": list(names),
            "cases": [{"id": c["id"], "role": role, "labelled": [names[v] for v in c["labelled"]],
                       "spacing_zyx_mm": list(c["volume"].spacing_zyx), "base_segment_s": c["seg_s"],
                       "base_parotids_clinic": c["base_parotids"],
                       "base_parotids_reference": c["base_parotids_reference"]}
                      for role, cs in (("user", users), ("other", others)) for c in cs],
            "runs": runs}


def run_clinic(args) -> dict:
    """The clinic part on OpenKBP with ``args.clinic_base`` (see :func:`clinic_experiment`)."""
    user_ids, other_ids = clinic_case_ids(args.clinic_cases, args.clinic_other, args.margin_mm)
    users, others = load_clinic_cases(user_ids, args.margin_mm), load_clinic_cases(other_ids, args.margin_mm)
    return clinic_experiment(get_model_spec(args.clinic_base), users, others, args)


# ---- output ----------------------------------------------------------------------------------------------

def _f(v) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.3f}"


def print_tables(result: dict) -> None:
    meta = result["meta"]
    print(f"\nSimulated-user fine-tuning ({meta['date']}, {meta['machine']}, device {meta['device']})\n")
    if "shift" in result:
        sh = result["shift"]
        base = [c["base_dice_shifted"] for c in sh["cases"]]
        clean = [c["base_dice_clean"] for c in sh["cases"] if c["base_dice_clean"] is not None]
        print(f"Domain shift: {sh['base']}, strength {sh['strength']}; base Dice shifted {np.mean(base):.3f}"
              + (f" (clean {np.mean(clean):.3f})" if clean else "") + f" over {len(base)} cases\n")
        print("| k | mode | untouched slices before | after | other cases before | after | fine-tune s | steps "
              "(stop) | device |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in sh["runs"]:
            print(f"| {r['k']} | {r['mode']} | {_f(r['corrected_before'])} | {_f(r['corrected_after'])} | "
                  f"{_f(r['other_before'])} | {_f(r['other_after'])} | {r['finetune_s']:.1f} | {r['steps']} "
                  f"({r['stop_reason']}) | {r['device']} |")
    if "newstruct" in result:
        ns = result["newstruct"]
        print(f"\nFew-shot new structure: {ns['structure']} on the example CT (crop {ns['crop_shape']}), base "
              f"{ns['base']}\n")
        print("| k | mode | Dice before | Dice after (untouched slices) | fine-tune s | steps (stop) | device |")
        print("|---|---|---|---|---|---|---|")
        for r in ns["runs"]:
            print(f"| {r['k']} | {r['mode']} | {_f(r['before'])} | {_f(r['after'])} | {r['finetune_s']:.1f} | "
                  f"{r['steps']} ({r['stop_reason']}) | {r['device']} |")
    if "clinic" in result:
        print_clinic_tables(result["clinic"])


def print_clinic_tables(cl: dict) -> None:
    """Markdown tables of the clinic part: parotids / other organs / parotid volume, then per-organ changes."""
    roles = [c["role"] for c in cl["cases"]]
    print(f"\nSecond clinic's style: {cl['style']}; base {cl['base']}; {roles.count('user')} user case(s) "
          f"({', '.join(c['id'] for c in cl['cases'] if c['role'] == 'user')}), {roles.count('other')} other\n")
    print("Dice to the clinic style; 'untouched': the user cases' uncorrected slices; 'other': never-corrected "
          "cases; mL: mean predicted parotid volume on the other cases (clinic style / reference in the header)\n")
    o0 = cl["runs"][0]["other"] if cl["runs"] else {}
    print("| k | mode | parotids untouched before | after | parotids other before | after | other organs untouched "
          "before | after | other organs other before | after | parotid mL before | after "
          f"(clinic {_f(o0.get('parotid_ml_clinic'))}, ref {_f(o0.get('parotid_ml_reference'))}) | fine-tune s | "
          "steps (stop) | device |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in cl["runs"]:
        u, o = r["user"], r["other"]
        print(f"| {r['k']} | {r['mode']} | {_f(u['parotids_before'])} | {_f(u['parotids_after'])} | "
              f"{_f(o['parotids_before'])} | {_f(o['parotids_after'])} | {_f(u['other_organs_before'])} | "
              f"{_f(u['other_organs_after'])} | {_f(o['other_organs_before'])} | {_f(o['other_organs_after'])} | "
              f"{_f(o['parotid_ml_before'])} | {_f(o['parotid_ml_after'])} | {r['finetune_s']:.1f} | {r['steps']} "
              f"({r['stop_reason']}) | {r['device']} |")
    organs = cl["labels"][1:]
    print("\nPer-organ Dice to the clinic style on the other cases, before -> after (change)\n")
    print("| k | mode | " + " | ".join(organs) + " |")
    print("|---|---|" + "---|" * len(organs))
    for r in cl["runs"]:
        o = r["other"]
        print(f"| {r['k']} | {r['mode']} | " + " | ".join(
            f"{_f(o['dice_before'][n])} -> {_f(o['dice_after'][n])} ({_d(o['dice_change'][n])})" for n in organs)
              + " |")


def _d(v) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:+.3f}"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [p for p in ("shift", "newstruct", "clinic") if p in result]
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4), squeeze=False)
    for ax, part in zip(axes[0], parts):
        runs = result[part]["runs"]
        for mode in sorted({r["mode"] for r in runs}):
            rs = sorted((r for r in runs if r["mode"] == mode), key=lambda r: r["k"])
            ks = [r["k"] for r in rs]
            if part == "shift":
                ax.plot(ks, [r["corrected_after"] for r in rs], "o-", label=f"untouched slices, after ({mode})")
                ax.plot(ks, [r["other_after"] for r in rs], "s-", label=f"other cases, after ({mode})")
            elif part == "clinic":
                ax.plot(ks, [r["user"]["parotids_after"] for r in rs], "o-", label=f"parotids, untouched ({mode})")
                ax.plot(ks, [r["other"]["parotids_after"] for r in rs], "s-", label=f"parotids, other cases ({mode})")
                ax.plot(ks, [r["other"]["other_organs_after"] for r in rs], "^-",
                        label=f"other organs, other cases ({mode})")
            else:
                ax.plot(ks, [r["after"] for r in rs], "o-", label=f"{result[part]['structure']}, after ({mode})")
        if part == "shift":
            ax.plot(ks, [r["corrected_before"] for r in rs], "k.--", label="untouched slices, before")
            ax.plot(ks, [r["other_before"] for r in rs], "kx:", label="other cases, before")
            ax.set_title(f"domain shift (strength {result[part]['strength']})")
        elif part == "clinic":
            ax.plot(ks, [r["user"]["parotids_before"] for r in rs], "k.--", label="parotids, untouched, before")
            ax.plot(ks, [r["other"]["parotids_before"] for r in rs], "kx:", label="parotids, other cases, before")
            ax.plot(ks, [r["other"]["other_organs_before"] for r in rs], "k^:", label="other organs, before",
                    alpha=0.5)
            ax.set_title(f"second clinic: parotids +{result[part]['margin_mm']} mm (Dice to its style)")
        else:
            ax.set_title(f"few-shot new structure ({result[part]['structure']})")
        ax.set_xlabel("k corrected slices")
        ax.set_ylabel("Dice")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    """The command-line options (also used by the tests to build settings)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--cases", type=int, default=2, help="shifted validation cases the user corrects")
    p.add_argument("--other", type=int, default=4, help="further shifted validation cases, never corrected")
    p.add_argument("--k", type=int, nargs="+", default=[1, 3, 5, 10], help="corrected slices per case")
    p.add_argument("--modes", nargs="+", default=None, choices=["decoder", "full"],
                   help="fine-tuning modes; default decoder and full (shift, newstruct), decoder only (clinic)")
    p.add_argument("--budget-s", type=float, default=120.0)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--patch", type=int, nargs=3, help="training patch (z y x); default finetune's")
    p.add_argument("--lr", type=float, help="default finetune's")
    p.add_argument("--patience", type=int, help="early-stop patience in evaluations; default finetune's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base", default="lightm_unet_3d", help="registered base model for the new-structure part")
    p.add_argument("--shift-base", default="lightm_unet_3d", help="registered hippocampus model for the shift part")
    p.add_argument("--strength", type=float, default=1.0, help="scanner shift strength (see scanner_shift)")
    p.add_argument("--scanner-seed", type=int, default=0)
    p.add_argument("--structure", default="spleen", choices=sorted(STRUCTURES))
    p.add_argument("--ct-margin", type=int, default=4, help="in-plane crop margin (CT voxels) around the structure")
    p.add_argument("--ct-slices", type=int, default=0, help="keep this many CT slices around the structure (0: all)")
    p.add_argument("--clinic-base", default="lightm_unet_3d_hn_oar", help="registered CT model for the clinic part")
    p.add_argument("--clinic-cases", type=int, default=2, help="OpenKBP val cases the clinic user corrects")
    p.add_argument("--clinic-other", type=int, default=0,
                   help="further OpenKBP val cases, never corrected (0: all the remaining ones with both parotids)")
    p.add_argument("--margin-mm", type=float, default=4.0, help="the clinic's extra parotid margin in mm")
    p.add_argument("--parts", nargs="+", default=["shift", "newstruct"], choices=["shift", "newstruct", "clinic"])
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke settings (1 + 1 cases, k=2, decoder, 4 steps, 8 CT slices); overrides those flags")
    p.add_argument("--out", type=Path, default=Path("finetune_benchmark"))
    p.add_argument("--json", type=Path, help="default: OUT/finetune.json")
    p.add_argument("--plot", type=Path, nargs="?", const=True, default=None,
                   help="write a PNG (default OUT/finetune.png)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parsed options with the per-part defaults resolved (``modes``, ``clinic_modes``, ``--quick``)."""
    args = build_parser().parse_args(argv)
    args.clinic_modes = args.modes or ["decoder"]
    args.modes = args.modes or ["decoder", "full"]
    if args.quick:
        args.cases, args.other, args.k, args.modes, args.clinic_modes = 1, 1, [2], ["decoder"], ["decoder"]
        args.max_steps, args.budget_s, args.ct_margin, args.ct_slices = 4, 30.0, 0, 8
        args.clinic_cases, args.clinic_other = 1, 1
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.json or args.out / "finetune.json"
    device_name = (torch.cuda.get_device_name() if args.device.startswith("cuda") and torch.cuda.is_available()
                   else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads")
    result: dict = {"meta": {
        "date": datetime.date.today().isoformat(), "machine": f"{os.cpu_count()}-core {platform.machine()}",
        "device": device_name, "command": "python benchmarks/finetune.py " + " ".join(sys.argv[1:] if argv is None
                                                                                      else argv),
        "torch": torch.__version__, "settings": {k: (str(v) if isinstance(v, Path) else v)
                                                 for k, v in vars(args).items()}}}
    t0 = time.perf_counter()
    if "shift" in args.parts:
        result["shift"] = run_shift(args)
    if "newstruct" in args.parts:
        result["newstruct"] = run_newstruct(args)
    if "clinic" in args.parts:
        result["clinic"] = run_clinic(args)
    result["meta"]["total_s"] = time.perf_counter() - t0
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1, default=float))
    print_tables(result)
    if args.plot:
        png = args.out / "finetune.png" if args.plot is True else args.plot
        plot(result, png)
        print(f"\nplot: {png}")
    print(f"json: {json_path}")
    return result


if __name__ == "__main__":
    main()
