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
from napari_medmamba.training.dataset import load_case_folder  # noqa: E402
from napari_medmamba.training.finetune import CorrectionExample, finetune  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
HIPPO = DATA / "msd_hippocampus"
SPLIT = ROOT / "weights" / "splits" / "msd_hippocampus.json"
CT = DATA / "totalseg" / "example_ct_sm.nii.gz"
CT_SEG = DATA / "totalseg" / "example_seg.nii.gz"
STRUCTURES = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5}
"""TotalSegmentator v2 class ids (``example_seg.nii.gz``) of the structures offered for part 2."""


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


def worst_slices(pred: np.ndarray, ref: np.ndarray, classes, k: int) -> list[int]:
    """The k axial (axis 0) slices with the lowest mean-class Dice, among slices with ground-truth foreground."""
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
            row = {"k": k, "mode": mode, "slices": touched, "finetune_s": res.seconds,
                   "lr": res.card["training"]["lr"], "patch": res.card["training"]["patch_size"], "steps": res.steps,
                   "best_step": res.best_step, "stop_reason": res.stop_reason, "train_slices": res.train_slices,
                   "heldout_slices": res.heldout_slices, "heldout_dice_before": res.dice_before.get("mean"),
                   "heldout_dice_after": res.dice_after.get("mean"), "device": res.card["training"]["device"],
                   "evals": _evals(res), "corrected": [], "other": []}
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


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [p for p in ("shift", "newstruct") if p in result]
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4), squeeze=False)
    for ax, part in zip(axes[0], parts):
        runs = result[part]["runs"]
        for mode in sorted({r["mode"] for r in runs}):
            rs = sorted((r for r in runs if r["mode"] == mode), key=lambda r: r["k"])
            ks = [r["k"] for r in rs]
            if part == "shift":
                ax.plot(ks, [r["corrected_after"] for r in rs], "o-", label=f"untouched slices, after ({mode})")
                ax.plot(ks, [r["other_after"] for r in rs], "s-", label=f"other cases, after ({mode})")
            else:
                ax.plot(ks, [r["after"] for r in rs], "o-", label=f"{result[part]['structure']}, after ({mode})")
        if part == "shift":
            ax.plot(ks, [r["corrected_before"] for r in rs], "k.--", label="untouched slices, before")
            ax.plot(ks, [r["other_before"] for r in rs], "kx:", label="other cases, before")
            ax.set_title(f"domain shift (strength {result[part]['strength']})")
        else:
            ax.set_title(f"few-shot new structure ({result[part]['structure']})")
        ax.set_xlabel("k corrected slices")
        ax.set_ylabel("Dice")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--cases", type=int, default=2, help="shifted validation cases the user corrects")
    p.add_argument("--other", type=int, default=4, help="further shifted validation cases, never corrected")
    p.add_argument("--k", type=int, nargs="+", default=[1, 3, 5, 10], help="corrected slices per case")
    p.add_argument("--modes", nargs="+", default=["decoder", "full"], choices=["decoder", "full"])
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
    p.add_argument("--parts", nargs="+", default=["shift", "newstruct"], choices=["shift", "newstruct"])
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke settings (1 + 1 cases, k=2, decoder, 4 steps, 8 CT slices); overrides those flags")
    p.add_argument("--out", type=Path, default=Path("finetune_benchmark"))
    p.add_argument("--json", type=Path, help="default: OUT/finetune.json")
    p.add_argument("--plot", type=Path, nargs="?", const=True, default=None,
                   help="write a PNG (default OUT/finetune.png)")
    args = p.parse_args(argv)
    if args.quick:
        args.cases, args.other, args.k, args.modes = 1, 1, [2], ["decoder"]
        args.max_steps, args.budget_s, args.ct_margin, args.ct_slices = 4, 30.0, 0, 8
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
