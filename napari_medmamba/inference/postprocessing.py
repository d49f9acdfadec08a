"""Clean-up of label maps, class by class: largest component, hole filling, small islands."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
from scipy import ndimage
from skimage import measure

__all__ = ["Postprocess", "keep_largest_component", "fill_holes", "remove_small_islands", "apply_postprocess"]


def _classes(labels: np.ndarray, classes: Iterable[int] | None) -> list[int]:
    present = [int(c) for c in np.unique(labels) if c != 0]
    return present if classes is None else [c for c in classes if c in present]


def _bbox(mask: np.ndarray) -> tuple[slice, ...]:
    return ndimage.find_objects(mask.astype(np.uint8))[0]


def keep_largest_component(labels: np.ndarray, classes: Iterable[int] | None = None) -> np.ndarray:
    """Keep only the largest 26-connected component of each class (others become background)."""
    out = labels.copy()
    for c in _classes(labels, classes):
        box = _bbox(labels == c)
        mask = labels[box] == c
        components = measure.label(mask, connectivity=mask.ndim)
        if components.max() > 1:
            sizes = np.bincount(components.ravel())
            sizes[0] = 0
            out[box][mask & (components != int(np.argmax(sizes)))] = 0
    return out


def fill_holes(labels: np.ndarray, classes: Iterable[int] | None = None) -> np.ndarray:
    """Fill background cavities fully enclosed by one class (other classes are left untouched)."""
    out = labels.copy()
    for c in _classes(labels, classes):
        box = _bbox(labels == c)
        filled = ndimage.binary_fill_holes(labels[box] == c)
        region = out[box]
        region[filled & (region == 0)] = c
    return out


def remove_small_islands(labels: np.ndarray, min_voxels: int, classes: Iterable[int] | None = None) -> np.ndarray:
    """Set components with fewer than ``min_voxels`` voxels (26-connected, per class) to background."""
    out = labels.copy()
    if min_voxels <= 1:
        return out
    for c in _classes(labels, classes):
        box = _bbox(labels == c)
        components = measure.label(labels[box] == c, connectivity=labels.ndim)
        small = np.bincount(components.ravel()) < min_voxels
        small[0] = False
        out[box][small[components]] = 0
    return out


@dataclass(frozen=True)
class Postprocess:
    """Which clean-up steps :func:`apply_postprocess` runs, in this order."""

    min_island_ml: float = 0.0
    """Remove components smaller than this volume in millilitres (0: keep all)."""
    largest_component: bool | tuple[int, ...] = False
    """True: every class; a tuple: only these classes."""
    fill_holes: bool | tuple[int, ...] = False


def _selection(option: bool | tuple[int, ...]) -> tuple[bool, Iterable[int] | None]:
    if isinstance(option, bool):
        return option, None
    return True, option


def apply_postprocess(
    labels: np.ndarray, config: Postprocess, voxel_volume_ml: float, cancel: Callable[[], None] = lambda: None
) -> np.ndarray:
    """Run the steps of ``config`` on ``labels``; ``cancel`` is called between steps (it may raise)."""
    if config.min_island_ml > 0:
        labels = remove_small_islands(labels, int(np.ceil(config.min_island_ml / voxel_volume_ml)))
        cancel()
    run, classes = _selection(config.largest_component)
    if run:
        labels = keep_largest_component(labels, classes)
        cancel()
    run, classes = _selection(config.fill_holes)
    if run:
        labels = fill_holes(labels, classes)
    return labels
