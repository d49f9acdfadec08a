"""Orientation (against SimpleITK's DICOMOrient), resampling and normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from napari_medmamba.inference.preprocessing import normalize, plan_orientation, resample_linear, working_shape
from napari_medmamba.io.volume import Geometry
from test_inference_support import contract


def _random_oblique(rng: np.random.Generator, seed: int) -> Geometry:
    signed_perm = np.eye(3)[rng.permutation(3)] * rng.choice([-1.0, 1.0], 3)
    direction, _ = np.linalg.qr(signed_perm + 0.3 * Rotation.random(random_state=seed).as_matrix())
    return Geometry(tuple(rng.uniform(0.5, 3, 3)), tuple(rng.uniform(-100, 100, 3)), tuple(direction.reshape(-1)))


def test_orientation_matches_dicomorient_and_undoes_exactly() -> None:
    rng = np.random.default_rng(0)
    for seed in range(60):
        geometry = _random_oblique(rng, seed)
        shape = tuple(int(s) for s in rng.integers(2, 7, 3))
        array = rng.normal(size=shape).astype(np.float32)
        code = "".join(("LR", "PA", "IS")[i][rng.integers(2)] for i in rng.permutation(3))
        plan = plan_orientation(geometry, shape, code)
        reference = sitk.DICOMOrient(geometry.apply_to(sitk.GetImageFromArray(array)), code)
        oriented = plan.apply(array)
        assert np.array_equal(oriented, sitk.GetArrayFromImage(reference))
        assert plan.geometry.isclose(Geometry.from_sitk(reference), atol=1e-9)
        assert plan.shape == oriented.shape
        assert np.array_equal(plan.undo(oriented), array)
        stacked = np.stack([array, -array])
        assert np.array_equal(plan.undo(plan.apply(stacked)), stacked)


def test_orientation_none_is_identity_and_bad_code_is_rejected() -> None:
    geometry = Geometry((1, 2, 3), (0, 0, 0))
    assert plan_orientation(geometry, (2, 3, 4), None).is_identity
    assert plan_orientation(geometry, (2, 3, 4), "LPS").is_identity
    with pytest.raises(ValueError):
        plan_orientation(geometry, (2, 3, 4), "LLS")


def test_resample_linear_reproduces_a_linear_ramp() -> None:
    source = Geometry((2.0, 1.0, 3.0), (5.0, -3.0, 7.0), (0, -1, 0, 1, 0, 0, 0, 0, 1))
    z, y, x = np.meshgrid(np.arange(10), np.arange(12), np.arange(8), indexing="ij")
    ramp = (3.0 * z * 3.0 + 2.0 * y * 1.0 - x * 2.0).astype(np.float32)  # linear in physical mm
    target = Geometry((1.0, 1.0, 1.0), source.origin, source.direction)
    shape = working_shape(ramp.shape, source.spacing_zyx, target.spacing_zyx)
    assert shape == (30, 12, 16)
    out = resample_linear(ramp, source, target, shape, slab=7)
    zz, yy, xx = np.meshgrid(np.arange(30), np.arange(12), np.arange(16), indexing="ij")
    expected = 3.0 * zz + 2.0 * yy - xx
    inside = (zz <= 27) & (xx <= 14)  # beyond the last source voxel: nearest extrapolation
    np.testing.assert_allclose(out[inside], expected[inside], atol=1e-3)
    assert np.isfinite(out).all()
    back = resample_linear(out, target, source, ramp.shape)
    np.testing.assert_allclose(back, ramp, atol=1e-3)


def test_normalize_ct_and_zscore() -> None:
    hu = np.array([[[-2000, -1000, 0, 40, 3000]]], dtype=np.int16)
    ct = normalize(hu, contract(normalization="ct", ct_window=(-1000.0, 1000.0), ct_stats=(0.0, 500.0)))
    np.testing.assert_allclose(ct.ravel(), [-2, -2, 0, 0.08, 2], atol=1e-6)
    assert ct.dtype == np.float32
    mr = normalize(np.arange(24, dtype=np.uint8).reshape(2, 3, 4), contract())
    assert abs(float(mr.mean())) < 1e-6 and abs(float(mr.std()) - 1.0) < 1e-5
    with pytest.raises(ValueError):
        normalize(hu, contract(normalization="ct"))


def test_resampling_can_be_cancelled_between_and_inside_slabs() -> None:
    from napari_medmamba.inference import SegmentationCancelled

    geometry = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    fine = Geometry((0.5, 0.5, 0.5), (0.0, 0.0, 0.0))
    array = np.zeros((8, 64, 64), np.float32)
    with pytest.raises(SegmentationCancelled):
        resample_linear(array, geometry, fine, (16, 128, 128), cancel=lambda: True)
    calls: list[int] = []

    def cancel_inside_the_first_slab() -> bool:
        calls.append(1)
        return len(calls) > 1  # the between-slab check passes; SimpleITK's progress event aborts

    with pytest.raises(SegmentationCancelled):
        resample_linear(array, geometry, fine, (16, 128, 128), cancel=cancel_inside_the_first_slab, slab=16)
