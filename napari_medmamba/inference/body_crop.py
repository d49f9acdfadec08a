"""Crop a CT to the patient's body before the sliding window: the air around it is background.

A head-and-neck CT is mostly air and couch around a body that fills half of it or less; tiling only the
body's bounding box (plus a margin) is the same answer at a fraction of the work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = ["BODY_MARGIN_MM", "BODY_MIN_FRACTION", "body_box", "normalised_body_box"]

BODY_MARGIN_MM = 12.0
"""Margin kept around the body's bounding box on every side."""
BODY_MIN_FRACTION = 0.05
"""Connected pieces above the threshold count as body when they have at least this fraction of the largest
piece's voxels (a head held apart from the shoulders by a mask still counts; specks of noise do not)."""


def body_box(image_hu: np.ndarray, threshold_hu: float, spacing_zyx: Sequence[float],
             margin_mm: float = BODY_MARGIN_MM, multiple: int = 1) -> tuple[slice, slice, slice] | None:
    """Bounding box (z, y, x slices) of the body in a CT given in HU, or None when nothing exceeds the threshold.

    The body is every connected piece of voxels above ``threshold_hu`` with at least
    ``BODY_MIN_FRACTION`` of the largest piece's size. The box gets ``margin_mm`` on every side and is
    grown (about its centre, within the image) to a multiple of ``multiple`` voxels per axis where the
    image allows.
    """
    mask = image_hu > threshold_hu
    if not mask.any():
        return None
    labels, _ = ndimage.label(mask)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    keep = set(np.flatnonzero(sizes >= BODY_MIN_FRACTION * sizes.max()).tolist())
    pieces = [box for value, box in enumerate(ndimage.find_objects(labels), start=1) if value in keep and box]
    box = []
    for axis, (n, spacing) in enumerate(zip(image_hu.shape, spacing_zyx)):
        margin = math.ceil(margin_mm / float(spacing))
        start = max(0, min(p[axis].start for p in pieces) - margin)
        stop = min(n, max(p[axis].stop for p in pieces) + margin)
        start, stop = _grow(start, stop, n, multiple)
        box.append(slice(start, stop))
    return tuple(box)  # type: ignore[return-value]


def normalised_body_box(image: np.ndarray, contract, multiple: int = 1) -> tuple[slice, slice, slice] | None:
    """:func:`body_box` of an image already normalised with a CT contract's scheme (training caches, fine-tuning
    examples): mapped back to (clipped) HU through ``contract.ct_stats``, on the contract's working spacing."""
    if contract.body_threshold_hu is None or contract.normalization != "ct" or contract.ct_stats is None:
        raise ValueError("cropping to the body needs a CT contract with body_threshold_hu")
    mean, std = contract.ct_stats
    hu = image.astype(np.float32) * np.float32(std) + np.float32(mean)
    return body_box(hu, contract.body_threshold_hu, contract.target_spacing or (1.0, 1.0, 1.0), multiple=multiple)


def _grow(start: int, stop: int, n: int, multiple: int) -> tuple[int, int]:
    """[start, stop) grown about its centre to a multiple of ``multiple`` (capped at n), kept inside [0, n)."""
    want = min(n, -(-(stop - start) // multiple) * multiple)
    extra = want - (stop - start)
    start = max(0, start - extra // 2)
    stop = start + want
    if stop > n:
        start, stop = n - want, n
    return start, stop
