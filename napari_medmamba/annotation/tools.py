"""Correction tools on numpy arrays (no GUI): what to review next, interpolation, scribbles.

All arrays are (z, y, x); ``axis`` picks the slicing direction (0 = axial for the usual
scan orientation). The functions return new arrays and never change their inputs, so
the caller can pass the result to :meth:`LabelHistory.apply` for undo.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy import ndimage

__all__ = [
    "slab",
    "take_slice",
    "next_slice_to_review",
    "interpolate_label",
    "scribble_refine",
]


def _check_axis(ndim: int, axis: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for a {ndim}D array")
    return axis % ndim


def slab(shape: tuple[int, ...], axis: int, start: int, stop: int) -> tuple[slice, ...]:
    """The region (one slice per axis) of slices ``start``..``stop - 1`` along ``axis``."""
    axis = _check_axis(len(shape), axis)
    region = [slice(0, n) for n in shape]
    region[axis] = slice(start, stop)
    return tuple(region)


def take_slice(array: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The 2D slice ``index`` along ``axis`` (a view)."""
    axis = _check_axis(array.ndim, axis)
    if not 0 <= index < array.shape[axis]:
        raise ValueError(f"slice {index} is outside 0..{array.shape[axis] - 1} on axis {axis}")
    key: list[slice | int] = [slice(None)] * array.ndim
    key[axis] = index
    return array[tuple(key)]


def next_slice_to_review(
    uncertainty: np.ndarray,
    reviewed: Iterable[int] | np.ndarray,
    axis: int = 0,
) -> int | None:
    """The unreviewed slice along ``axis`` with the highest mean uncertainty.

    ``reviewed`` is a collection of slice indices on ``axis`` (e.g.
    ``EditLog.reviewed_indices(axis)``) or a boolean array with one entry per slice.
    NaN uncertainties are ignored; ties go to the lowest index. Returns None when every
    slice has been reviewed.
    """
    uncertainty = np.asarray(uncertainty, dtype=float)
    axis = _check_axis(uncertainty.ndim, axis)
    n = uncertainty.shape[axis]
    done = np.zeros(n, dtype=bool)
    if isinstance(reviewed, np.ndarray) and reviewed.dtype == bool:
        if reviewed.shape != (n,):
            raise ValueError(f"reviewed mask has shape {reviewed.shape}, expected ({n},)")
        done[:] = reviewed
    else:
        indices = np.fromiter((int(i) for i in reviewed), dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= n):
            raise ValueError(f"reviewed slice index outside 0..{n - 1}")
        done[indices] = True
    if done.all():
        return None
    other = tuple(a for a in range(uncertainty.ndim) if a != axis)
    finite = np.isfinite(uncertainty)
    sums = np.where(finite, uncertainty, 0.0).sum(axis=other)
    counts = finite.sum(axis=other)
    means = np.divide(sums, counts, out=np.full(n, -np.inf), where=counts > 0)
    means[done] = -np.inf
    best = int(np.argmax(means))
    if done[best]:  # every candidate is -inf (all NaN): take the first unreviewed slice
        best = int(np.flatnonzero(~done)[0])
    return best


def _signed_distance(mask: np.ndarray, sampling: tuple[float, float]) -> np.ndarray:
    """Signed distance (mm) to the boundary of a non-empty 2D mask: negative inside.

    Boundaries lie half a pixel from pixel centres, so ``sdf < 0`` gives ``mask`` back.
    """
    half = 0.5 * min(sampling)
    outside = ndimage.distance_transform_edt(~mask, sampling=sampling) - half
    inside = ndimage.distance_transform_edt(mask, sampling=sampling) - half
    return np.where(mask, -inside, outside)


def _distance_to_point(shape: tuple[int, int], point: np.ndarray, sampling: tuple[float, float]) -> np.ndarray:
    """Distance (mm) of every pixel to ``point``: the signed distance of a shape shrunk to a point."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return np.hypot((yy - point[0]) * sampling[0], (xx - point[1]) * sampling[1])


def interpolate_label(
    labels: np.ndarray,
    label: int,
    axis: int,
    i0: int,
    i1: int,
    *,
    spacing: tuple[float, float] | None = None,
    align_centroids: bool = True,
    overwrite: bool = False,
) -> np.ndarray:
    """Fill the slices strictly between ``i0`` and ``i1`` with ``label`` by shape-based interpolation.

    The signed distance maps of ``label`` on slices ``i0`` and ``i1`` are blended
    linearly; a voxel is inside where the blend is negative. With ``align_centroids``
    both maps are first moved so that the shapes' centroids meet at the linearly
    interpolated centroid, so a shape that moves between the slices (and does not
    overlap itself) is carried along instead of vanishing. If one end slice has no
    ``label``, the shape shrinks to a point at the other shape's centroid.

    Returns the new content of the slices between them
    (``labels[slab(labels.shape, axis, lo + 1, hi)]``): voxels of ``label`` outside the
    interpolated shape become 0, and other labels are kept unless ``overwrite``.
    ``spacing`` is the in-plane pixel size (rows, columns) in mm for anisotropic pixels.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be 3D, got shape {labels.shape}")
    axis = _check_axis(3, axis)
    lo, hi = sorted((int(i0), int(i1)))
    n = labels.shape[axis]
    if lo < 0 or hi >= n:
        raise ValueError(f"slices {i0} and {i1} must lie in 0..{n - 1} on axis {axis}")
    if hi - lo < 2:
        raise ValueError(f"slices {i0} and {i1} have no slice between them to fill")
    if label == 0:
        raise ValueError("label 0 is the background; pick the label to interpolate")
    m0 = take_slice(labels, axis, lo) == label
    m1 = take_slice(labels, axis, hi) == label
    if not (m0.any() or m1.any()):
        raise ValueError(f"label {label} is on neither slice {lo} nor slice {hi}")
    sampling = (1.0, 1.0) if spacing is None else (float(spacing[0]), float(spacing[1]))
    c0 = np.argwhere(m0).mean(axis=0) if m0.any() else None
    c1 = np.argwhere(m1).mean(axis=0) if m1.any() else None
    c0 = c1 if c0 is None else c0
    c1 = c0 if c1 is None else c1
    d0 = _signed_distance(m0, sampling) if m0.any() else _distance_to_point(m0.shape, c0, sampling)
    d1 = _signed_distance(m1, sampling) if m1.any() else _distance_to_point(m1.shape, c1, sampling)

    block = labels[slab(labels.shape, axis, lo + 1, hi)].copy()
    moved = np.moveaxis(block, axis, 0)  # a view: writes go to block
    for k in range(hi - lo - 1):
        t = (k + 1) / (hi - lo)
        if align_centroids and not np.allclose(c0, c1):
            ct = (1.0 - t) * c0 + t * c1
            a = ndimage.shift(d0, ct - c0, order=1, mode="nearest")
            b = ndimage.shift(d1, ct - c1, order=1, mode="nearest")
        else:
            a, b = d0, d1
        inside = (1.0 - t) * a + t * b < 0
        plane = moved[k]
        plane[(plane == label) & ~inside] = 0
        target = inside if overwrite else inside & ((plane == 0) | (plane == label))
        plane[target] = label
    return block


def scribble_refine(
    probabilities: np.ndarray,
    labels: np.ndarray,
    scribbles_fg: np.ndarray,
    scribbles_bg: np.ndarray,
    slice_index: int,
    axis: int,
    label: int,
    *,
    beta: float = 130.0,
    margin: int = 10,
) -> np.ndarray:
    """Re-segment ``label`` on one slice from the model's probabilities and the user's scribbles.

    ``probabilities`` is the probability map of ``label`` (same shape as ``labels``), or
    all classes stacked first (C, z, y, x), of which channel ``label`` is used.
    ``scribbles_fg`` / ``scribbles_bg`` are boolean masks of the slice (2D) or of the
    volume (3D, the slice is taken). A random walker (scikit-image) seeded by the
    scribbles runs on the probability map within the bounding box of the scribbles and
    the current ``label`` on the slice, grown by ``margin`` pixels; the box border
    where the probability is below 0.5 also seeds background. Pixels the walker gives
    to the foreground become ``label`` (other labels are kept except under a
    foreground scribble); ``label`` pixels it gives to the background become 0.
    Returns the new 2D slice; ``labels`` is not changed.
    """
    from skimage.segmentation import random_walker

    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be 3D, got shape {labels.shape}")
    axis = _check_axis(3, axis)
    probabilities = np.asarray(probabilities)
    if probabilities.ndim == 4:
        if not 0 <= label < probabilities.shape[0]:
            raise ValueError(f"label {label} has no channel in probabilities of shape {probabilities.shape}")
        probabilities = probabilities[label]
    if probabilities.shape != labels.shape:
        raise ValueError(f"probabilities shape {probabilities.shape} does not match labels {labels.shape}")

    current = take_slice(labels, axis, slice_index)
    prob = take_slice(probabilities, axis, slice_index).astype(float)
    fg = _slice_mask(scribbles_fg, labels.shape, axis, slice_index, "scribbles_fg")
    bg = _slice_mask(scribbles_bg, labels.shape, axis, slice_index, "scribbles_bg")
    if not fg.any():
        raise ValueError("scribble_refine needs at least one foreground scribble")
    bg &= ~fg

    rows, cols = np.nonzero(fg | bg | (current == label))
    r0, r1 = max(rows.min() - margin, 0), min(rows.max() + margin + 1, current.shape[0])
    c0, c1 = max(cols.min() - margin, 0), min(cols.max() + margin + 1, current.shape[1])
    box = (slice(r0, r1), slice(c0, c1))

    seeds = np.zeros((r1 - r0, c1 - c0), dtype=np.int32)
    border = np.ones_like(seeds, dtype=bool)
    border[1:-1, 1:-1] = False
    seeds[border & (prob[box] < 0.5)] = 2
    seeds[bg[box]] = 2
    seeds[fg[box]] = 1
    if not (seeds == 2).any():
        raise ValueError("scribble_refine needs a background scribble (the model's map gives none around it)")

    walked = random_walker(prob[box], seeds, beta=beta, mode="cg_j", tol=1e-4)
    new = current.copy()
    region = new[box]
    region[(walked == 2) & (region == label)] = 0
    region[(walked == 1) & ((region == 0) | (region == label))] = label
    region[fg[box]] = label
    return new


def _slice_mask(mask: np.ndarray, shape: tuple[int, ...], axis: int, index: int, name: str) -> np.ndarray:
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim == 3:
        if mask.shape != shape:
            raise ValueError(f"{name} has shape {mask.shape}, expected {shape}")
        return take_slice(mask, axis, index).copy()
    plane = tuple(n for a, n in enumerate(shape) if a != axis)
    if mask.shape != plane:
        raise ValueError(f"{name} has shape {mask.shape}, expected the slice shape {plane}")
    return mask.copy()
