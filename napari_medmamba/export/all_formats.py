"""Every export of one label map in one call: the shared back end of the napari Export widget and
``napari-medmamba export``. Each format is attempted; failures are collected, not raised."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from ..io import Volume
from ..io.write import write_labels
from .dicom_seg import export_dicom_seg
from .meshes import export_meshes
from .rtstruct import export_rtstruct
from .summary_json import export_summary_json
from .volumes_csv import export_volumes_csv

__all__ = ["EDITS_SUFFIX", "FORMATS", "LABEL_MAP_EXT", "hex_to_rgb01", "run_exports", "safe_stem"]


def hex_to_rgb01(color: str) -> tuple[float, float, float]:
    """'#rrggbb' -> (r, g, b) in 0..1."""
    color = color.lstrip("#")
    return tuple(int(color[i : i + 2], 16) / 255.0 for i in (0, 2, 4))  # type: ignore[return-value]


FORMATS: dict[str, str] = {
    "nifti": "NIfTI label map (.nii.gz)",
    "nrrd": "NRRD label map (.nrrd)",
    "mha": "MetaImage label map (.mha)",
    "dicom_seg": "DICOM-SEG (.dcm)",
    "rtstruct": "RTSTRUCT contours for treatment planning (.dcm)",
    "csv": "Label volumes table (.csv: mL, bounding box in mm)",
    "stl": "Surface meshes (.stl, mm)",
    "obj": "Surface meshes (.obj, mm)",
    "json": "Summary (.json)",
    "edits": "Edit log: reviewed slices and corrections, for fine-tuning (.npz)",
}
LABEL_MAP_EXT = {"nifti": ".nii.gz", "nrrd": ".nrrd", "mha": ".mha"}
EDITS_SUFFIX = "_edits.npz"
"""File name suffix of an exported edit log (``<case>_edits.npz``, beside ``<case>.nii.gz``)."""


def safe_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "labels"


def run_exports(
    labels: np.ndarray,
    source: Volume,
    folder: Path,
    stem: str,
    formats: list[str],
    *,
    label_names: tuple[str, ...] | list[str],
    label_colors: tuple[str, ...] | list[str],
    model_name: str | None,
    edit_log: Any = None,
) -> tuple[list[Path], list[str]]:
    """Write each format; returns (files written, error messages). Qt-free; runs in a worker."""
    written: list[Path] = []
    errors: list[str] = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not folder.is_dir():
            raise NotADirectoryError(f"{folder} is not a folder")
    except OSError as exc:
        return [], [f"Cannot write to the folder {str(folder)!r}: {exc.strerror or exc}"]
    names = {i: n for i, n in enumerate(label_names) if i}
    colors = {i: hex_to_rgb01(c) for i, c in enumerate(label_colors) if i}
    for fmt in formats:
        try:
            if fmt in LABEL_MAP_EXT:
                written.append(write_labels(labels, source, folder / f"{stem}{LABEL_MAP_EXT[fmt]}"))
            elif fmt == "dicom_seg":
                written.append(export_dicom_seg(labels, source, names, colors, folder / f"{stem}_seg.dcm",
                                                model_name=model_name or "napari-medmamba", edit_log=edit_log))
            elif fmt == "rtstruct":
                written.append(export_rtstruct(labels, source, folder / f"{stem}_rtstruct.dcm", names, colors,
                                               model_name=model_name or "napari-medmamba", edit_log=edit_log))
            elif fmt == "csv":
                written.append(export_volumes_csv(labels, source.geometry, names, folder / f"{stem}_volumes.csv"))
            elif fmt in ("stl", "obj"):
                sub = folder / f"{stem}_meshes"
                written.extend(export_meshes(labels, source.geometry, names, sub, fmt=fmt))
            elif fmt == "json":
                written.append(export_summary_json(
                    folder / f"{stem}_summary.json", names, label_colors=colors, labels=labels,
                    geometry=source.geometry, model_name=model_name, edit_log=edit_log,
                ))
            elif fmt == "edits":
                if edit_log is None:
                    raise ValueError("there is no edit log (review or correct some slices first)")
                written.append(edit_log.save(folder / f"{stem}{EDITS_SUFFIX}"))
            else:
                errors.append(f"unknown export format {fmt!r}")
        except Exception as exc:  # report, keep exporting the other formats
            errors.append(f"{FORMATS.get(fmt, fmt)}: {exc}")
    return written, errors
