"""Label names, colours and per-label statistics shared by the exporters."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..io.volume import Geometry

__all__ = [
    "LabelNames",
    "LabelColors",
    "LabelStats",
    "label_names_dict",
    "label_colors_dict",
    "label_stats",
    "present_labels",
    "safe_file_stem",
]

LabelNames = Mapping[int, str] | Sequence[str] | None
"""``{value: name}``, or a list indexed by label value (entry 0, the background, ignored)."""
LabelColors = Mapping[int, Sequence[float]] | None
"""``{value: (r, g, b[, a])}`` with components in 0..1 (napari) or 0..255."""


def label_names_dict(label_names: LabelNames) -> dict[int, str]:
    """Label names as ``{value: name}`` (background 0 left out)."""
    if label_names is None:
        return {}
    items = label_names.items() if isinstance(label_names, Mapping) else enumerate(label_names)
    return {int(v): str(n) for v, n in items if int(v) != 0}


def label_colors_dict(label_colors: LabelColors) -> dict[int, tuple[int, int, int]]:
    """Colours as ``{value: (r, g, b)}`` with 0..255 integers."""
    out: dict[int, tuple[int, int, int]] = {}
    for value, color in (label_colors or {}).items():
        rgb = np.asarray(color, dtype=float).ravel()[:3]
        if rgb.size != 3 or not np.all(np.isfinite(rgb)) or rgb.min() < 0:
            raise ValueError(f"colour of label {value} must be (r, g, b) with components >= 0, got {color!r}")
        if rgb.max() <= 1.0:
            rgb = rgb * 255.0
        if rgb.max() > 255:
            raise ValueError(f"colour of label {value} has a component above 255: {color!r}")
        out[int(value)] = tuple(int(round(c)) for c in rgb)  # type: ignore[assignment]
    return out


def present_labels(labels: np.ndarray) -> list[int]:
    """Non-zero label values present in ``labels``, ascending."""
    values = np.unique(labels)
    return [int(v) for v in values if v != 0]


def check_label_map(labels: np.ndarray, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """``labels`` as a 3D non-negative integer array, or ``ValueError`` saying what is wrong."""
    labels = np.asarray(labels)
    if labels.dtype == np.bool_:
        labels = labels.astype(np.uint8)
    if labels.ndim != 3:
        raise ValueError(f"labels must be 3D (z, y, x), got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if shape is not None and tuple(labels.shape) != tuple(shape):
        raise ValueError(f"label shape {labels.shape} differs from the scan grid {tuple(shape)} (z, y, x)")
    if labels.size and np.issubdtype(labels.dtype, np.signedinteger) and int(labels.min()) < 0:
        raise ValueError(f"labels must not be negative (minimum {int(labels.min())})")
    return labels


@dataclass(frozen=True)
class LabelStats:
    """Size and extent of one label."""

    value: int
    name: str
    voxel_count: int
    volume_ml: float
    bbox_index: tuple[slice, slice, slice] | None
    """(z, y, x) slices of the voxels holding the label; None when it is absent."""
    bbox_min_mm: tuple[float, float, float] | None
    """Physical (x, y, z) LPS minimum corner over the label's voxel centres."""
    bbox_max_mm: tuple[float, float, float] | None


def physical_bounds(
    bbox: tuple[slice, slice, slice], geometry: Geometry, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Min and max LPS (x, y, z) mm over voxel centres of a (z, y, x) index box.

    For an axis-aligned grid the box corners give the answer; for an oblique one the
    voxels of ``mask`` (the label within the box) are used, when given.
    """
    matrix = geometry.index_to_physical_matrix()
    direction = geometry.direction_matrix
    axis_aligned = np.allclose(np.abs(direction), np.round(np.abs(direction)), atol=1e-6)
    offset = np.array([bbox[2].start, bbox[1].start, bbox[0].start], dtype=float)
    if axis_aligned or mask is None:
        z, y, x = bbox
        points = np.array(
            [[i, j, k] for i in (x.start, x.stop - 1) for j in (y.start, y.stop - 1) for k in (z.start, z.stop - 1)],
            dtype=float,
        )
    else:
        points = np.argwhere(mask)[:, ::-1] + offset
    physical = points @ matrix[:3, :3].T + matrix[:3, 3]
    return physical.min(axis=0), physical.max(axis=0)


def label_stats(
    labels: np.ndarray, geometry: Geometry, label_names: LabelNames = None, include_absent: bool = True
) -> list[LabelStats]:
    """Per label (present, plus named ones when ``include_absent``): count, mL, bounding box."""
    labels = check_label_map(labels)
    names = label_names_dict(label_names)
    present = present_labels(labels)
    values = sorted(set(present) | (set(names) if include_absent else set()))
    if labels.dtype == np.uint64:
        labels = labels.astype(np.int64)  # scipy and bincount need values that fit a signed index
    boxes = ndimage.find_objects(labels, max_label=max(values, default=0)) if values else []
    counts = np.bincount(labels.ravel(), minlength=max(values, default=0) + 1)
    out = []
    for value in values:
        box = boxes[value - 1] if value - 1 < len(boxes) else None
        count = int(counts[value]) if value < counts.size else 0
        lo = hi = None
        if box is not None and count:
            lo_arr, hi_arr = physical_bounds(box, geometry, labels[box] == value)
            lo, hi = tuple(float(v) for v in lo_arr), tuple(float(v) for v in hi_arr)
        out.append(
            LabelStats(
                value=value,
                name=names.get(value, f"label {value}"),
                voxel_count=count,
                volume_ml=count * geometry.voxel_volume_ml,
                bbox_index=box if count else None,
                bbox_min_mm=lo,  # type: ignore[arg-type]
                bbox_max_mm=hi,  # type: ignore[arg-type]
            )
        )
    return out


def safe_file_stem(value: int, name: str) -> str:
    """A file name stem for a label: ``<value>_<name>`` with only safe characters."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "label"
    return f"{value}_{slug[:80]}"
