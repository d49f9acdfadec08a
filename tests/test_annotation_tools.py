"""Correction tools on crafted arrays: review order, shape interpolation, scribble refinement."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medmamba.annotation.tools import interpolate_label, next_slice_to_review, scribble_refine, slab


def _disc(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


# ---- next_slice_to_review -------------------------------------------------------------
def test_next_slice_is_the_most_uncertain_unreviewed_one() -> None:
    u = np.zeros((5, 4, 6))
    u[1] = 0.9
    u[3] = 0.5
    u[3, 0, 0] = 1.0  # mean of slice 3 still below slice 1
    assert next_slice_to_review(u, set()) == 1
    assert next_slice_to_review(u, {1}) == 3
    assert next_slice_to_review(u, np.array([False, True, False, True, False])) in (0, 2, 4)
    assert next_slice_to_review(u, range(5)) is None


def test_next_slice_on_other_axes_and_nan() -> None:
    u = np.zeros((3, 4, 5))
    u[:, :, 2] = 0.7
    u[:, 1, :] = np.nan
    assert next_slice_to_review(u, [], axis=2) == 2
    assert next_slice_to_review(u, [2], axis=2) == 0  # ties: lowest index
    assert next_slice_to_review(u, [], axis=1) in (0, 2, 3)  # the all-NaN row never wins over a finite one
    u_nan = np.full((2, 2, 2), np.nan)
    assert next_slice_to_review(u_nan, [0]) == 1
    with pytest.raises(ValueError):
        next_slice_to_review(u, [7])


# ---- interpolate_label ----------------------------------------------------------------
def test_interpolating_identical_slices_copies_the_shape() -> None:
    labels = np.zeros((7, 20, 20), np.uint8)
    shape = _disc((20, 20), (9, 10), 5) & ~_disc((20, 20), (9, 10), 2)  # a ring
    labels[0][shape] = 3
    labels[6][shape] = 3
    block = interpolate_label(labels, 3, 0, 0, 6)
    assert block.shape == (5, 20, 20)
    for plane in block:
        np.testing.assert_array_equal(plane == 3, shape)


def test_interpolation_moves_and_grows_the_shape() -> None:
    labels = np.zeros((20, 11, 60), np.int32)
    labels[:, 0, :][_disc((20, 60), (10, 15), 4)] = 1
    labels[:, 10, :][_disc((20, 60), (10, 45), 8)] = 1
    block = interpolate_label(labels, 1, axis=1, i0=10, i1=0)  # order does not matter
    assert block.shape == (20, 9, 60)
    middle = block[:, 4, :] == 1  # slice 5: halfway
    cy, cx = np.argwhere(middle).mean(axis=0)
    assert abs(cx - 30) < 1.0 and abs(cy - 10) < 1.0
    area = middle.sum()
    assert abs(area - np.pi * 6**2) < 0.15 * np.pi * 6**2


def test_interpolation_keeps_other_labels_and_clears_stale_voxels() -> None:
    labels = np.zeros((5, 10, 10), np.uint8)
    labels[0, 2:8, 2:8] = 1
    labels[4, 2:8, 2:8] = 1
    labels[2, 4, 4] = 9  # another structure
    labels[2, 0, 0] = 1  # a stray voxel of label 1 outside the interpolated shape
    block = interpolate_label(labels, 1, 0, 0, 4)
    assert block[1, 4, 4] == 9 and block[1, 0, 0] == 0
    assert (block[:, 2:8, 2:8][block[:, 2:8, 2:8] != 9] == 1).all()
    assert interpolate_label(labels, 1, 0, 0, 4, overwrite=True)[1, 4, 4] == 1
    assert labels[2, 0, 0] == 1  # input untouched


def test_interpolation_towards_an_empty_slice_shrinks() -> None:
    labels = np.zeros((5, 30, 30), np.uint8)
    labels[0][_disc((30, 30), (15, 15), 10)] = 2
    block = interpolate_label(labels, 2, 0, 0, 4)
    areas = [(p == 2).sum() for p in block]
    assert areas[0] > areas[1] > areas[2] >= 0


def test_interpolation_errors() -> None:
    labels = np.zeros((5, 4, 4), np.uint8)
    with pytest.raises(ValueError, match="neither"):
        interpolate_label(labels, 1, 0, 0, 4)
    with pytest.raises(ValueError, match="no slice between"):
        interpolate_label(labels, 1, 0, 1, 2)
    with pytest.raises(ValueError, match="must lie"):
        interpolate_label(labels, 1, 0, 0, 5)


def test_slab_region() -> None:
    assert slab((4, 5, 6), 1, 2, 4) == (slice(0, 4), slice(2, 4), slice(0, 6))


# ---- scribble_refine ------------------------------------------------------------------
def _two_blobs() -> tuple[np.ndarray, np.ndarray]:
    """Probability map with two bright blobs; the current label covers both and the gap."""
    prob = np.full((3, 40, 60), 0.05)
    prob[1][_disc((40, 60), (20, 15), 8)] = 0.95
    prob[1][_disc((40, 60), (20, 45), 8)] = 0.9
    labels = np.zeros(prob.shape, np.uint8)
    labels[1, 10:31, 5:56] = 1
    labels[1, 0:3, 0:3] = 4  # another label, away from the scribbles
    return prob, labels


def test_scribbles_split_off_a_leak() -> None:
    prob, labels = _two_blobs()
    fg = np.zeros((40, 60), bool)
    fg[18:22, 13:17] = True
    bg = np.zeros((40, 60), bool)
    bg[18:22, 43:47] = True
    new = scribble_refine(prob, labels, fg, bg, slice_index=1, axis=0, label=1)
    assert new.shape == (40, 60)
    left, right = _disc((40, 60), (20, 15), 8), _disc((40, 60), (20, 45), 8)
    assert (new[left] == 1).mean() > 0.95
    assert (new[right] == 1).mean() < 0.05
    assert new[0, 0] == 4
    assert labels[1, 20, 45] == 1  # input untouched


def test_foreground_scribble_adds_a_missed_region_with_class_probabilities() -> None:
    prob1, _ = _two_blobs()
    probs = np.stack([1 - prob1, prob1])  # (C, z, y, x)
    labels = np.zeros(prob1.shape, np.uint8)
    labels[1][_disc((40, 60), (20, 15), 8)] = 1  # the model found only the left blob
    fg = np.zeros(prob1.shape, bool)  # 3D scribble volume
    fg[1, 19:21, 44:46] = True
    bg = np.zeros(prob1.shape, bool)
    new = scribble_refine(probs, labels, fg, bg, slice_index=1, axis=0, label=1)
    right = _disc((40, 60), (20, 45), 8)
    assert (new[right] == 1).mean() > 0.9
    assert (new[~(right | _disc((40, 60), (20, 15), 8))] == 1).mean() < 0.05


def test_scribble_refine_on_another_axis_and_errors() -> None:
    prob, labels = _two_blobs()
    prob_t, labels_t = prob.transpose(1, 0, 2).copy(), labels.transpose(1, 0, 2).copy()  # slice on axis 1
    fg = np.zeros((40, 60), bool)
    fg[19:21, 14:16] = True
    bg = np.zeros((40, 60), bool)
    bg[19:21, 44:46] = True
    new = scribble_refine(prob_t, labels_t, fg, bg, slice_index=1, axis=1, label=1)
    assert new[20, 15] == 1 and new[20, 45] == 0
    with pytest.raises(ValueError, match="foreground scribble"):
        scribble_refine(prob, labels, np.zeros((40, 60), bool), bg, 1, 0, 1)
    with pytest.raises(ValueError, match="slice shape"):
        scribble_refine(prob, labels, np.ones((5, 5), bool), bg, 1, 0, 1)
