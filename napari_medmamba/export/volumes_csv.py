"""Per-label volumes and bounding boxes as CSV (mm, mL, LPS)."""

from __future__ import annotations

import csv
import io
from os import PathLike
from pathlib import Path

import numpy as np

from ..atomic_write import atomic_write
from ..io.volume import Geometry
from .errors import ExportError
from .label_table import LabelNames, label_stats

__all__ = ["export_volumes_csv", "VOLUMES_CSV_COLUMNS"]

VOLUMES_CSV_COLUMNS: tuple[str, ...] = (
    "label_value",
    "label_name",
    "voxel_count",
    "volume_ml",
    "bbox_min_x_mm",
    "bbox_min_y_mm",
    "bbox_min_z_mm",
    "bbox_max_x_mm",
    "bbox_max_y_mm",
    "bbox_max_z_mm",
)
"""Columns of the CSV; bounding boxes are over voxel centres, in LPS millimetres."""


def export_volumes_csv(
    labels: np.ndarray,
    geometry: Geometry,
    label_names: LabelNames,
    path: str | PathLike[str],
) -> Path:
    """Write one row per label (present or named): value, name, voxels, mL, LPS bounding box.

    Named labels that are absent get a row with 0 voxels and empty bounding box cells.
    Written atomically (UTF-8, comma separated, header row); returns the path.
    """
    path = Path(path)
    try:
        stats = label_stats(labels, geometry, label_names)
    except ValueError as exc:
        raise ExportError(path, str(exc)) from None
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(VOLUMES_CSV_COLUMNS)
    for s in stats:
        box = ["" for _ in range(6)]
        if s.bbox_min_mm is not None and s.bbox_max_mm is not None:
            box = [f"{v:.3f}" for v in (*s.bbox_min_mm, *s.bbox_max_mm)]
        writer.writerow([s.value, s.name, s.voxel_count, f"{s.volume_ml:.4f}", *box])
    try:
        return atomic_write(path, buffer.getvalue().encode("utf-8"))
    except OSError as exc:
        raise ExportError(path, str(exc.strerror or exc)) from None
