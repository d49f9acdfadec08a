"""Geometry-exact cropping and the cropped sample scan."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from napari_medmamba.io import Geometry, Volume
from napari_medmamba.samples import load_sample


def _oblique_volume() -> Volume:
    angle = np.deg2rad(30)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, -1]])
    geometry = Geometry((0.7, 1.3, 2.5), (-12.0, 30.5, 101.0), tuple(rot.ravel()))
    return Volume(np.arange(6 * 7 * 8, dtype=np.int16).reshape(6, 7, 8), geometry)


def test_crop_keeps_every_voxel_at_its_physical_position() -> None:
    vol = _oblique_volume()
    sub = vol.crop((1, 2, 3), (5, 6, 7))
    assert sub.shape == (4, 4, 4)
    np.testing.assert_array_equal(sub.array, vol.array[1:5, 2:6, 3:7])
    image = vol.geometry.apply_to(sitk.Image(8, 7, 6, sitk.sitkInt16))
    sub_image = sub.geometry.apply_to(sitk.Image(4, 4, 4, sitk.sitkInt16))
    for zyx in [(0, 0, 0), (3, 1, 2), (3, 3, 3)]:
        outer = (zyx[2] + 3, zyx[1] + 2, zyx[0] + 1)
        np.testing.assert_allclose(sub_image.TransformIndexToPhysicalPoint(zyx[::-1]),
                                   image.TransformIndexToPhysicalPoint(outer), atol=1e-9)


def test_physical_to_index_inverts_index_to_physical() -> None:
    geometry = _oblique_volume().geometry
    idx = np.array([[0.0, 0.0, 0.0], [2.5, 1.0, 4.0]])
    phys = (geometry.index_to_physical_matrix() @ np.c_[idx, np.ones(2)].T).T[:, :3]
    np.testing.assert_allclose(geometry.physical_to_index(phys), idx, atol=1e-9)


def test_crop_outside_the_grid_is_refused() -> None:
    with pytest.raises(ValueError, match="does not overlap"):
        _oblique_volume().crop((6, 0, 0), (9, 3, 3))


def test_hippocampus_sample_is_a_box_around_the_right_hippocampus() -> None:
    full = load_sample("mni152_t1")
    crop = load_sample("mni152_t1_right_hippocampus")
    assert crop.shape == (36, 52, 36)
    # the box centre lies at MNI (RAS) (+28, -22, -14) mm, i.e. LPS (-28, +22, -14), within a voxel
    centre_idx = (np.array(crop.shape[::-1]) - 1) / 2.0
    centre = crop.geometry.index_to_physical_matrix() @ np.append(centre_idx, 1.0)
    np.testing.assert_allclose(centre[:3], (-28.0, 22.0, -14.0), atol=1.0)
    start = np.rint(full.geometry.physical_to_index(np.asarray(crop.geometry.origin))).astype(int)[::-1]
    np.testing.assert_array_equal(crop.array, full.array[start[0]:start[0] + 36, start[1]:start[1] + 52,
                                                         start[2]:start[2] + 36])
