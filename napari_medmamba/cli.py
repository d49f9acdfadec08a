"""``napari-medmamba`` command line: Unix habits (``--help``, exit codes, progress on stderr).

Exit codes: 0 success, 1 at least one case failed, 2 usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from . import __version__

__all__ = ["main", "build_parser"]

LABEL_SUFFIX = "_labels.nii.gz"
POSTPROCESS_CHOICES = ("recommended", "none", "largest")  # = inference.postprocessing.POSTPROCESS_CHOICES (no torch import)
POSTPROCESS_HELP = ("label clean-up: recommended = the one measured for this model (head-and-neck CT: largest "
                    "component of brainstem, parotids, larynx, mandible; hippocampus: none), none, or largest = "
                    "largest component of every structure (default: %(default)s)")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _StderrProgress:
    """Prints ``[case] stage 42%`` lines on stderr, at most one per 2 % step."""

    def __init__(self, case: str, quiet: bool) -> None:
        self.case, self.quiet, self.last = case, quiet, -1

    def __call__(self, fraction: float, stage: str) -> None:
        percent = int(fraction * 100)
        if self.quiet or percent < self.last + 2 and percent < 100:
            return
        self.last = percent
        _stderr(f"[{self.case}] {stage} {percent:3d}%")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-medmamba",
        description="Mamba-based 3D medical image segmentation (research use, not for clinical decisions).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo", help="segment the bundled sample scan (offline) and write the results")
    p.add_argument("--output", "-o", type=Path, default=Path("medmamba-demo"), help="output folder (default: %(default)s)")
    p.add_argument("--model", default=None, help="registered model name (default: the default model)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    p.add_argument("--postprocess", choices=POSTPROCESS_CHOICES, default="recommended", help=POSTPROCESS_HELP)
    p.add_argument("--view", action="store_true", help="also open the result in napari (needs a display)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("segment", help="segment scans (files, DICOM folders, globs) into OUTDIR")
    p.add_argument("inputs", nargs="+", help="scan files, DICOM folders or glob patterns")
    p.add_argument("--output", "-o", type=Path, required=True, help="output folder")
    p.add_argument("--model", default=None, help="registered model name (default: the default model)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    p.add_argument("--mode", choices=("accurate", "fast"), default="accurate",
                   help="fast: 1.5x coarser grid, less window overlap; about 2x faster on a CPU for large scans but "
                        "much less accurate (mean Dice: hippocampus 0.88 -> 0.74, head-and-neck CT 0.71 -> 0.41): "
                        "a quick preview (default: %(default)s)")
    p.add_argument("--postprocess", choices=POSTPROCESS_CHOICES, default="recommended", help=POSTPROCESS_HELP)
    p.add_argument("--mirror", action="store_true",
                   help="test-time mirroring: also predict each tile mirrored left-right and average (models that "
                        "declare it: the 3D hippocampus models; hippocampus mean Dice 0.879 -> 0.882 at twice the "
                        "inference time)")
    p.add_argument("--overwrite", action="store_true", help="redo cases whose output already exists")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                       help="segment on a local Dask cluster of N worker processes (1 thread and, with GPUs, "
                            "1 GPU each; listens on 127.0.0.1 only); needs napari-medmamba[dask]")
    scale.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="segment on an existing Dask cluster, e.g. tcp://host:8786 or tls://host:8786 "
                            "(workers must see the input and output paths); needs napari-medmamba[dask]")
    p.add_argument("--threads-per-worker", type=_positive_int, default=None, metavar="T",
                   help="CPU threads (torch, SimpleITK) per Dask worker (default with --workers N: "
                        "cpu_count // N; with --scheduler: the workers' own settings)")
    p.set_defaults(func=_cmd_segment)

    p = sub.add_parser("export", help="export a label map: label maps, DICOM-SEG, RTSTRUCT, volume CSV, meshes, JSON")
    p.add_argument("labels", type=Path, help="label map on the scan's grid (NIfTI, NRRD, MHA)")
    p.add_argument("--scan", type=Path, required=True, help="the source scan (a DICOM folder for DICOM-SEG and RTSTRUCT)")
    p.add_argument("--output", "-o", type=Path, required=True, help="output folder")
    p.add_argument("--formats", nargs="+", default=["csv", "json"], metavar="FORMAT",
                   help="any of: nifti nrrd mha dicom_seg rtstruct csv stl obj json (default: csv json)")
    p.add_argument("--model", default=None, help="model whose label names/colours to use (default: the default model)")
    p.add_argument("--json", action="store_true", help="print the written files as JSON")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("train", help="train a registered architecture on a folder of image/label pairs")
    p.add_argument("data", type=Path, help="folder with imagesTr/ and labelsTr/ (MSD or nnU-Net raw layout)")
    p.add_argument("--output", "-o", type=Path, required=True, help="folder for checkpoint, weights and model card")
    p.add_argument("--model", default=None, help="registered architecture (default: the default model)")
    p.add_argument("--budget-s", type=float, default=600.0, help="training time in seconds (default: %(default)s)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--split", type=Path, default=None, help="split JSON with 'train' and 'val' case ids")
    p.add_argument("--val-fraction", type=float, default=0.2, help="held-out share when no --split (default: 0.2)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--patch-size", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=None,
                   help="channels of the network's first level (default: the model's own; each level doubles)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the model card as JSON")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("finetune", help="fine-tune a model on corrected cases (scan + corrected labels + edit log)",
                       description="Fine-tune a model on scans the user corrected. For each SCAN, the corrected label map "
                       "<case>_labels.nii.gz and the edit log <case>_edits.npz (Export > 'Edit log' in napari) are read "
                       "from --labels. Only reviewed or corrected voxels are learned from. The new model is saved, "
                       "owner-only, in the model store and can then be used by name: segment --model NAME.")
    p.add_argument("inputs", nargs="+", metavar="SCAN", help="corrected scans: files, DICOM folders or globs")
    p.add_argument("--labels", "-l", type=Path, required=True,
                   help="folder with <case>_labels.nii.gz and <case>_edits.npz for each scan")
    p.add_argument("--whole-labels", action="store_true",
                   help="no edit logs: every voxel of each label map was checked (e.g. expert contours)")
    p.add_argument("--model", default=None, help="model to adapt (default: the default model)")
    p.add_argument("--name", default=None, help="name of the new model (default: <model>-ft-<hash>)")
    p.add_argument("--store", type=Path, default=None,
                   help="model store folder (default: $MEDMAMBA_MODELS_DIR or the per-user folder)")
    p.add_argument("--budget-s", type=float, default=60.0, help="training time limit in seconds (default: %(default)s)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--mode", default="decoder", choices=["decoder", "full"],
                   help="decoder: decoder + norms (parameter-efficient, default); full: every weight")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    p.add_argument("--json", action="store_true", help="print the new model's card as JSON")
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser("bench", help="time the selective scan and a segmentation on this machine")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("models", help="list the registered and fine-tuned models; remove fine-tuned ones")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--store", type=Path, default=None, help="model store folder (default: the per-user folder)")
    p.add_argument("--remove", metavar="NAME", default=None, help="delete this fine-tuned model from the store")
    p.add_argument("--clear-finetuned", action="store_true", help="delete every fine-tuned model in the store")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("info", help="print a scan's shape and geometry")
    p.add_argument("path", type=Path)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        _stderr("interrupted")
        return 130


# --- subcommands -------------------------------------------------------------------------


def _cmd_models(args: argparse.Namespace) -> int:
    from .models import default_model_name, get_model_spec, list_models
    from .training.model_store import clear_finetuned, default_model_store, list_finetuned, remove_finetuned

    store = args.store or default_model_store()
    if args.remove:
        try:
            remove_finetuned(args.remove, store)
        except KeyError as exc:
            _stderr(f"error: {exc.args[0]}")
            return 1
        _stderr(f"removed {args.remove} from {store}")
        return 0
    if args.clear_finetuned:
        _stderr(f"removed {clear_finetuned(store)} fine-tuned model(s) from {store}")
        return 0
    rows = []
    for name in list_models():
        spec = get_model_spec(name)
        c = spec.contract
        rows.append({
            "name": name,
            "default": name == default_model_name(),
            "dims": c.spatial_dims,
            "modality": c.modality,
            "labels": list(c.label_names),
            "weights": spec.weights,
            "description": spec.description,
        })
    for m in list_finetuned(store):
        if m.name in {r["name"] for r in rows}:
            continue
        rows.append({"name": m.name, "default": False, "finetuned": True, "base_model": m.base_model,
                     "weights": str(m.weights), "dice_before": m.card.get("dice_before", {}).get("mean"),
                     "dice_after": m.card.get("dice_after", {}).get("mean"), "description": "fine-tuned"})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        mark = "*" if r["default"] else " "
        if r.get("finetuned"):
            before, after = r["dice_before"], r["dice_after"]
            dice = "" if before is None or after is None else f", held-back Dice {before:.3f} -> {after:.3f}"
            print(f"  {r['name']:<24} fine-tuned from {r['base_model']}{dice}  [{r['weights']}]")
        else:
            weights = r["weights"] or "no shipped weights"
            print(f"{mark} {r['name']:<24} {r['dims']}D {r['modality']:<3} {', '.join(r['labels'][1:])}  [{weights}]")
    print(f"fine-tuned models are stored in {store}", file=sys.stderr)
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    import numpy as np

    from .annotation.edit_log import EditLog, EditLogError
    from .export.all_formats import EDITS_SUFFIX
    from .io import VolumeReadError, read_volume
    from .io.volume import scan_name
    from .models import default_model_name
    from .training.finetune import CorrectionExample, finetune
    from .training.model_store import default_model_store

    paths = _expand_inputs(args.inputs)
    if not paths:
        _stderr("error: no input matched")
        return 1
    examples = []
    for path in paths:
        case = scan_name(path)
        label_path = args.labels / f"{case}{LABEL_SUFFIX}"
        edits_path = args.labels / f"{case}{EDITS_SUFFIX}"
        try:
            scan, labels = read_volume(path), read_volume(label_path)
            if labels.shape != scan.shape:
                raise ValueError(f"{label_path}: label map {labels.shape} is not on the grid of {path} {scan.shape}")
            if args.whole_labels:
                log = EditLog(scan.shape)
                for z in range(scan.shape[0]):
                    log.accept_slice(0, z)
            elif edits_path.is_file():
                log = EditLog.load(edits_path)
                if log.shape != scan.shape:
                    raise ValueError(f"{edits_path}: edit log shape {log.shape} differs from the scan {scan.shape}")
            else:
                raise FileNotFoundError(f"{edits_path} not found: export the edit log from napari, or pass "
                                        "--whole-labels if every voxel of the label map was checked")
        except (OSError, ValueError, VolumeReadError, EditLogError) as exc:
            _stderr(f"error: {case}: {exc}")
            return 1
        examples.append(CorrectionExample(scan, np.rint(labels.array).astype(np.int64), log))
    base = args.model or default_model_name()
    store = args.store or default_model_store()
    _stderr(f"fine-tuning {base} on {len(examples)} corrected case(s), mode {args.mode}, budget {args.budget_s:g} s")
    try:
        result = finetune(base, examples, budget_s=args.budget_s, max_steps=args.max_steps, mode=args.mode,
                          device=args.device, seed=args.seed, out_dir=store, name=args.name,
                          progress=_StderrProgress("finetune", args.quiet))
    except (ValueError, KeyError) as exc:
        _stderr(f"error: {exc}")
        return 1
    before, after = result.dice_before.get("mean"), result.dice_after.get("mean")
    _stderr(f"saved {result.spec.name} to {result.weights_path} ({result.steps} steps, {result.seconds:.0f} s, "
            f"stopped: {result.stop_reason})"
            + ("" if before is None else f"; held-back Dice {before:.3f} -> {after:.3f}"))
    _stderr(f"use it with: napari-medmamba segment SCAN -o OUT --model {result.spec.name}")
    if args.json:
        print(json.dumps(result.card, indent=2))
    else:
        print(result.spec.name)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .io import VolumeReadError, read_volume

    try:
        vol = read_volume(args.path)
    except VolumeReadError as exc:
        _stderr(f"error: {exc}")
        return 1
    info = {
        "path": str(args.path),
        "shape_zyx": list(vol.shape),
        "dtype": str(vol.array.dtype),
        "modality": vol.modality,
        **vol.geometry.to_dict(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:>10}: {value}")
    return 0


def _expand_inputs(patterns: Sequence[str]) -> list[Path]:
    import glob

    paths: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if any(ch in pattern for ch in "*?[") else [pattern]
        paths.extend(Path(m) for m in matches)
    return paths


def postprocess_column(choice: str, config: Any, label_names: Sequence[str]) -> str:
    """The summary's ``postprocess`` value: the choice and what it did, e.g. 'recommended: largest component
    of brainstem, larynx'."""
    from .inference.postprocessing import describe_postprocess

    return choice if choice == "none" else f"{choice}: {describe_postprocess(config, label_names)}"


def summary_row(volume: Any, case: str, output: Path, model_name: str, device: str, seconds: float,
                label_names: Sequence[str], labels: Any, postprocess: str | None = None) -> dict[str, Any]:
    """One case's row of the batch summary CSV: case, status, output, shape, spacing, model, postprocess
    (when given, see :func:`postprocess_column`), device, seconds, mL."""
    import numpy as np

    counts = np.bincount(np.asarray(labels).ravel().astype(np.int64), minlength=len(label_names))
    row: dict[str, Any] = {
        "case": case,
        "status": "ok",
        "output": str(output),
        "shape": "x".join(str(s) for s in volume.shape),
        "spacing_mm": "x".join(f"{s:.4g}" for s in volume.geometry.spacing_zyx),
        "model": model_name,
        **({} if postprocess is None else {"postprocess": postprocess}),
        "device": device,
        "seconds": round(seconds, 3),
    }
    for value, name in enumerate(label_names[1:], start=1):
        row[f"{name}_ml"] = round(float(counts[value]) * volume.geometry.voxel_volume_ml, 4)
    return row


SEGMENT_STAGES = ("preprocess", "inference", "forward", "resample", "postprocess")
"""The engine's timings that :func:`segment_case` reports as ``seg_<stage>_s``."""


def segment_case(volume: Any, case: str, outdir: Path, model: Any, device: str, mode: str, quiet: bool,
                 stages: dict[str, float] | None = None,
                 progress: Callable[[float, str], None] | None = None,
                 postprocess: str = "recommended", mirror: bool = False) -> dict[str, Any]:
    """Segment one scan into ``outdir/<case>_labels.nii.gz``; returns a summary row.

    ``stages`` (when given) receives the wall seconds ``segment_s`` and ``write_s`` and the engine's own
    ``seg_<stage>_s`` timings; ``progress`` replaces the stderr progress line. ``postprocess`` is one of
    :data:`POSTPROCESS_CHOICES` (see ``napari_medmamba.inference.postprocessing.postprocess_for``); ``mirror``
    is ``segment``'s test-time mirroring.
    """
    from .inference import postprocess_for, segment
    from .io import write_labels

    start = time.perf_counter()
    config = postprocess_for(postprocess, model)
    result = segment(volume, model, device=device, mode=mode, postprocess=config,
                     progress=progress or _StderrProgress(case, quiet), mirror=mirror)
    written = time.perf_counter()
    out = write_labels(result.labels.array, like=volume, path=outdir / f"{case}{LABEL_SUFFIX}")
    if stages is not None:
        stages.update(segment_s=written - start, write_s=time.perf_counter() - written)
        stages.update({f"seg_{k}_s": result.timings[k] for k in SEGMENT_STAGES if k in result.timings})
    return summary_row(volume, case, out, result.model_name, result.device, time.perf_counter() - start,
                       result.label_names, result.labels.array,
                       postprocess=postprocess_column(postprocess, config, result.label_names))


def _cmd_segment(args: argparse.Namespace) -> int:
    from .inference import resolve_model
    from .io import read_volume
    from .io.volume import scan_name
    from .models import default_model_name

    paths = _expand_inputs(args.inputs)
    if not paths:
        _stderr("error: no input matched")
        return 1
    args.output.mkdir(parents=True, exist_ok=True)
    if args.workers is not None or args.scheduler is not None:
        return _segment_distributed(args, paths)
    net, contract, name, warnings = resolve_model(args.model or default_model_name())  # loaded once for all cases
    for warning in warnings:
        _stderr(f"warning: {warning}")
    model = (net, contract, name)
    rows: list[dict[str, Any]] = []
    for path in paths:
        case = scan_name(path)
        target = args.output / f"{case}{LABEL_SUFFIX}"
        if target.exists() and not args.overwrite:
            rows.append({"case": case, "status": "skipped (exists)", "output": str(target)})
            if not args.quiet:
                _stderr(f"[{case}] exists, skipped (use --overwrite to redo)")
            continue
        try:
            rows.append(segment_case(read_volume(path), case, args.output, model, args.device, args.mode, args.quiet,
                                     postprocess=args.postprocess, mirror=args.mirror))
        except Exception as exc:  # one bad case is reported, the rest go on
            _stderr(f"[{case}] failed: {exc}")
            rows.append({"case": case, "status": f"failed: {exc}"})
    return _finish_segment(args, rows)


def _segment_distributed(args: argparse.Namespace, paths: list[Path]) -> int:
    """``segment --workers N`` / ``--scheduler ADDRESS``: one Dask task per case (napari_medmamba.distributed)."""
    from .distributed import DistributedUnavailable, connect, local_cluster, run_batch
    from .models import default_model_name, get_model_spec

    name = args.model or default_model_name()
    spec = get_model_spec(name)  # unknown names fail here, before any cluster starts
    if spec.weights is None:
        _stderr(f"warning: model {name!r} runs with random weights (it has no trained weights yet): the labels are meaningless")
    log = None if args.quiet else _stderr
    try:
        if args.scheduler is not None:
            cluster = connect(args.scheduler, threads_per_worker=args.threads_per_worker)
        else:
            cluster = local_cluster(args.workers, device=args.device, log=_stderr,
                                    threads_per_worker=args.threads_per_worker)
        with cluster as client:
            rows = run_batch(client, paths, args.output, name, device=args.device, mode=args.mode,
                             overwrite=args.overwrite, log=log, postprocess=args.postprocess, mirror=args.mirror)
    except DistributedUnavailable as exc:
        _stderr(f"error: {exc}")
        return 2
    except (OSError, TimeoutError, RuntimeError, ValueError) as exc:  # e.g. no scheduler at ADDRESS
        _stderr(f"error: cluster: {exc}")
        return 1
    return _finish_segment(args, rows)


def _finish_segment(args: argparse.Namespace, rows: list[dict[str, Any]]) -> int:
    _write_summary_csv(rows, args.output / "summary.csv")
    failed = sum(r["status"].startswith("failed") for r in rows)
    if args.json:
        print(json.dumps({"cases": rows, "failed": failed}, indent=2))
    elif not args.quiet:
        _stderr(f"{len(rows) - failed} of {len(rows)} cases done; summary: {args.output / 'summary.csv'}")
    return 1 if failed else 0


def _write_summary_csv(rows: list[dict[str, Any]], path: Path) -> None:
    import io

    from .atomic_write import atomic_write

    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, text.getvalue().encode())


def _cmd_export(args: argparse.Namespace) -> int:
    from .export.all_formats import FORMATS, run_exports, safe_stem
    from .io import VolumeReadError, read_volume
    from .io.volume import scan_name
    from .models import default_model_name, get_model_spec

    unknown = [f for f in args.formats if f not in FORMATS]
    if unknown:
        _stderr(f"error: unknown format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
        return 2
    try:
        scan, labels = read_volume(args.scan), read_volume(args.labels)
    except VolumeReadError as exc:
        _stderr(f"error: {exc}")
        return 1
    if labels.shape != scan.shape or not labels.geometry.isclose(scan.geometry, atol=1e-4):
        _stderr(f"error: {args.labels} is not on the grid of {args.scan} (shape {labels.shape} vs {scan.shape})")
        return 1
    contract = get_model_spec(args.model or default_model_name()).contract
    written, errors = run_exports(labels.array, scan, args.output, safe_stem(scan_name(args.labels)), args.formats,
                                  label_names=contract.label_names, label_colors=contract.label_colors,
                                  model_name=args.model)
    for message in errors:
        _stderr(f"error: {message}")
    if args.json:
        print(json.dumps({"written": [str(p) for p in written], "errors": errors}, indent=2))
    else:
        for path in written:
            print(path)
    return 1 if errors else 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .models import default_model_name
    from .training.dataset import build_cache, load_case_folder
    from .training.splits import load_split, make_split, save_split
    from .training.trainer import train

    name = args.model or default_model_name()
    cases = load_case_folder(args.data)
    if len(cases) < 2:
        _stderr(f"error: {args.data} holds {len(cases)} labelled case(s); training needs at least 2")
        return 1
    args.output.mkdir(parents=True, exist_ok=True)
    if args.split:
        split = load_split(args.split)
    else:
        n_val = min(len(cases) - 1, max(1, round(args.val_fraction * len(cases))))
        split = make_split([c[0] for c in cases], n_val, seed=args.seed, dataset=str(args.data.name))
    save_split(split, args.output / "split.json")
    cache = args.output / "cache.npz"
    if not cache.exists():
        _stderr(f"preparing {len(cases)} cases for {name} -> {cache}")
        build_cache(cases, cache, model_name=name, source=str(args.data.name), log=_stderr)
    card = train(name, cache, args.output, budget_s=args.budget_s, split=split, batch_size=args.batch_size,
                 seed=args.seed, device=args.device, log=_stderr, max_steps=args.max_steps,
                 patch_size=args.patch_size, width=args.width)
    if args.json:
        print(json.dumps(card, indent=2))
    else:
        dice = card["validation_dice"]["mean_foreground"]
        print(f"{args.output / 'weights.safetensors'}: validation Dice {dice['mean']:.3f} "
              f"[{dice['ci95'][0]:.3f}, {dice['ci95'][1]:.3f}] on {card['validation_dice']['n_cases']} cases")
    return 0


BENCH_SCAN_SHAPES = ((1, 64, 89600, 16), (1, 128, 11200, 16))
"""(B, D, L, N) of the default model's two largest scan calls at its default patch (docs/models.md)."""


def _median_seconds(fn: Any, repeats: int) -> float:
    import statistics

    fn()  # warm-up (compilation, caches)
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from .inference import resolve_model, segment
    from .inference.planner import choose_device
    from .models import default_model_name
    from .samples import load_sample
    from .ssm import selective_scan_fn
    from .ssm.dispatch import resolve_backend

    device = str(choose_device(args.device))
    rows: list[dict[str, Any]] = []
    gen = torch.Generator().manual_seed(0)
    for batch, dim, length, n in BENCH_SCAN_SHAPES:
        def rand(*size: int, scale: float = 1.0) -> torch.Tensor:
            return (torch.randn(*size, generator=gen) * scale).to(device)

        inputs = dict(u=rand(batch, dim, length), delta=rand(batch, dim, length, scale=0.5), A=-rand(dim, n).abs() - 0.5,
                      B=rand(batch, n, length), C=rand(batch, n, length), D=rand(dim), z=rand(batch, dim, length),
                      delta_bias=rand(dim), delta_softplus=True)

        def scan() -> None:
            with torch.no_grad():
                selective_scan_fn(**inputs)
            if device.startswith("cuda"):
                torch.cuda.synchronize()

        seconds = _median_seconds(scan, args.repeats)
        backend = resolve_backend(device)
        rows.append({"what": f"selective scan {(batch, dim, length, n)} fp32 forward ({backend})", "seconds": seconds})
    volume = load_sample(DEMO_SAMPLE)
    net, contract, name, _ = resolve_model(default_model_name())
    model = (net, contract, name)
    seconds = _median_seconds(lambda: segment(volume, model, device=device, return_probabilities=False), args.repeats)
    rows.append({"what": f"segment {DEMO_SAMPLE} {volume.shape} with {name} (accurate)", "seconds": seconds})
    info = {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads(), "results": rows}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats}")
        print("| measurement | seconds |\n|---|---|")
        for row in rows:
            print(f"| {row['what']} | {row['seconds']:.3f} |")
    return 0


DEMO_SAMPLE = "mni152_t1_right_hippocampus"


def _cmd_demo(args: argparse.Namespace) -> int:
    from .io import write_volume
    from .models import default_model_name, get_model_spec
    from .samples import load_sample

    name = args.model or default_model_name()
    spec = get_model_spec(name)
    volume = load_sample(DEMO_SAMPLE)
    _stderr(f"sample {DEMO_SAMPLE}: {volume.shape} (z, y, x), spacing {volume.geometry.spacing_zyx} mm; model {name}")
    if spec.weights is None:
        _stderr(f"note: model {name!r} has no trained weights shipped yet: its output is from random initial weights")
    args.output.mkdir(parents=True, exist_ok=True)
    scan_file = write_volume(volume, args.output / f"{DEMO_SAMPLE}.nii.gz")
    row = segment_case(volume, DEMO_SAMPLE, args.output, name, args.device, "accurate", quiet=False,
                       postprocess=args.postprocess)
    row["scan"] = str(scan_file)
    _write_summary_csv([row], args.output / "summary.csv")
    print(json.dumps(row, indent=2))
    from .samples import ct_hint

    _stderr(f"CT: {ct_hint()}")
    if args.view:
        import napari

        viewer = napari.Viewer()
        viewer.open(str(scan_file), plugin="napari-medmamba")
        viewer.open(row["output"], plugin="napari-medmamba", layer_type="labels")
        napari.run()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
