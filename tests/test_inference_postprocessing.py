"""Largest component, hole filling and small-island removal on crafted label maps."""

from __future__ import annotations

import numpy as np

from napari_medmamba.inference.postprocessing import (
    Postprocess,
    apply_postprocess,
    fill_holes,
    keep_largest_component,
    remove_small_islands,
)


def _two_classes_with_islands() -> np.ndarray:
    labels = np.zeros((10, 12, 12), np.uint8)
    labels[1:5, 1:5, 1:5] = 1  # 64 voxels
    labels[7:9, 8:10, 8:10] = 1  # 8 voxels
    labels[6:9, 1:4, 1:4] = 2  # 27 voxels
    labels[1, 10, 10] = 2  # 1 voxel
    return labels


def test_keep_largest_component_per_class() -> None:
    labels = _two_classes_with_islands()
    out = keep_largest_component(labels)
    assert np.count_nonzero(out == 1) == 64 and np.count_nonzero(out == 2) == 27
    assert out[8, 9, 9] == 0 and out[1, 10, 10] == 0
    only_two = keep_largest_component(labels, classes=(2,))
    assert np.count_nonzero(only_two == 1) == 72 and np.count_nonzero(only_two == 2) == 27
    assert labels[8, 9, 9] == 1  # input untouched


def test_diagonal_neighbours_are_one_component() -> None:
    labels = np.zeros((3, 3, 3), np.uint8)
    labels[0, 0, 0] = labels[1, 1, 1] = labels[2, 2, 2] = 1
    np.testing.assert_array_equal(keep_largest_component(labels), labels)


def test_fill_holes_fills_enclosed_background_only() -> None:
    labels = np.zeros((9, 9, 9), np.uint8)
    labels[1:8, 1:8, 1:8] = 1
    labels[3:6, 3:6, 3:6] = 0  # enclosed cavity
    labels[4, 4, 4] = 2  # another class inside the cavity stays
    labels[0:4, 7, 7] = 0  # a notch open to the outside stays open
    out = fill_holes(labels)
    assert np.count_nonzero(out[3:6, 3:6, 3:6] == 1) == 26 and out[4, 4, 4] == 2
    assert (out[0:4, 7, 7] == 0).all()


def test_remove_small_islands() -> None:
    labels = _two_classes_with_islands()
    out = remove_small_islands(labels, min_voxels=8)
    assert np.count_nonzero(out == 1) == 72 and np.count_nonzero(out == 2) == 27  # 8 voxels is kept
    out = remove_small_islands(labels, min_voxels=9)
    assert np.count_nonzero(out == 1) == 64 and np.count_nonzero(out == 2) == 27


def test_apply_postprocess_converts_millilitres() -> None:
    labels = _two_classes_with_islands()
    cleaned = apply_postprocess(labels, Postprocess(min_island_ml=0.016), voxel_volume_ml=0.002)  # 8 voxels
    assert np.count_nonzero(cleaned == 1) == 72 and cleaned[1, 10, 10] == 0
    np.testing.assert_array_equal(apply_postprocess(labels, Postprocess(), 1.0), labels)
