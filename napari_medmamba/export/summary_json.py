"""A JSON summary of an export: labels, colours, model, weights hash, edits (no patient data)."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timezone
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..atomic_write import atomic_write
from ..annotation.edit_log import EditLog
from ..io.volume import Geometry
from .errors import ExportError
from .label_table import LabelColors, LabelNames, label_colors_dict, label_names_dict, label_stats

__all__ = ["export_summary_json", "sha256_of_file", "SUMMARY_FORMAT"]

SUMMARY_FORMAT = "napari-medmamba export summary"


def sha256_of_file(path: str | PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def export_summary_json(
    path: str | PathLike[str],
    label_names: LabelNames,
    *,
    label_colors: LabelColors = None,
    labels: np.ndarray | None = None,
    geometry: Geometry | None = None,
    model_name: str | None = None,
    model_version: str | None = None,
    weights_sha256: str | None = None,
    weights_path: str | PathLike[str] | None = None,
    edit_log: EditLog | None = None,
) -> Path:
    """Write a summary JSON atomically; returns the path.

    It holds the label names and colours (hex), per-label voxel counts and mL when
    ``labels`` and ``geometry`` are given, the model name/version, the SHA-256 of the
    weights (``weights_sha256`` or computed from ``weights_path``; the path itself is
    not written), and ``edit_log.summary()``. No patient identifiers, no file paths.
    """
    path = Path(path)
    try:
        if weights_sha256 is None and weights_path is not None:
            weights_sha256 = sha256_of_file(weights_path)
        names = label_names_dict(label_names)
        colors = label_colors_dict(label_colors)
        stats = {}
        if labels is not None:
            if geometry is None:
                raise ValueError("give the geometry with the labels (volumes need the voxel size)")
            stats = {s.value: s for s in label_stats(labels, geometry, names)}
    except OSError as exc:
        raise ExportError(path, f"cannot read the weights file ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise ExportError(path, str(exc)) from None
    if weights_sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", weights_sha256):
        raise ExportError(path, f"weights_sha256 is not a SHA-256 hex digest: {weights_sha256!r}")

    entries: list[dict[str, Any]] = []
    for value in sorted(set(names) | set(colors) | set(stats)):
        entry: dict[str, Any] = {"value": value, "name": names.get(value, f"label {value}")}
        entry["color"] = _hex(colors[value]) if value in colors else None
        if value in stats:
            entry["voxel_count"] = stats[value].voxel_count
            entry["volume_ml"] = round(stats[value].volume_ml, 6)
        entries.append(entry)
    summary: dict[str, Any] = {
        "format": SUMMARY_FORMAT,
        "format_version": 1,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "software": {"name": "napari-medmamba", "version": __version__},
        "model": {
            "name": model_name,
            "version": model_version,
            "weights_sha256": weights_sha256.lower() if weights_sha256 else None,
        },
        "labels": entries,
    }
    if geometry is not None:
        summary["grid"] = {
            "shape_zyx": list(labels.shape) if labels is not None else None,
            "spacing_xyz_mm": list(geometry.spacing),
            "coordinate_system": "LPS",
        }
    if edit_log is not None:
        summary["edits"] = edit_log.summary()
    try:
        return atomic_write(path, (json.dumps(summary, indent=2) + "\n").encode("utf-8"))
    except OSError as exc:
        raise ExportError(path, str(exc.strerror or exc)) from None
