"""write_labels / write_volume then read_volume give back the same voxels, dtype and geometry."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st

from napari_medmamba.io import VOLUME_EXTENSIONS, Geometry, Volume, read_volume, write_labels, write_volume

NIFTI = (".nii.gz", ".nii")


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """A proper rotation (det +1) from three angles in radians."""
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


OBLIQUE = Geometry((0.7, 1.3, 2.9), (-123.456, 87.654, -321.987), tuple(rotation(0.35, -0.61, 0.87).ravel()))


def assert_same_geometry(read: Geometry, written: Geometry, ext: str) -> None:
    """Equal to 1e-6; NIfTI stores geometry as float32, so there 1e-6 relative to each value."""
    for name in ("spacing", "origin", "direction"):
        got, want = np.asarray(getattr(read, name)), np.asarray(getattr(written, name))
        atol = 1e-6 + (np.abs(want) * np.finfo(np.float32).eps * 8 if ext in NIFTI else 0)
        assert np.all(np.abs(got - want) <= atol), (name, ext, got - want)


def test_oblique_fixture_is_a_proper_rotation() -> None:
    m = OBLIQUE.direction_matrix
    np.testing.assert_allclose(m @ m.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(m) == pytest.approx(1.0)
    assert np.count_nonzero(np.abs(m) > 0.05) == 9  # oblique in every axis


@pytest.mark.parametrize("ext", VOLUME_EXTENSIONS)
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_labels_round_trip_oblique(tmp_path: Path, ext: str, dtype: type) -> None:
    rng = np.random.default_rng(7)
    like = Volume(rng.normal(size=(7, 9, 11)).astype(np.float32), OBLIQUE)
    labels = rng.integers(0, np.iinfo(dtype).max, size=like.shape, endpoint=True).astype(dtype)
    path = write_labels(labels, like, tmp_path / f"labels{ext}")
    assert path == tmp_path / f"labels{ext}"
    back = read_volume(path)
    assert back.array.dtype == dtype
    np.testing.assert_array_equal(back.array, labels)
    assert_same_geometry(back.geometry, OBLIQUE, ext)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


@pytest.mark.parametrize("ext", [".nrrd", ".mha"])
@settings(max_examples=15, deadline=None)
@given(
    angles=st.tuples(*[st.floats(-np.pi, np.pi)] * 3),
    spacing=st.tuples(*[st.floats(0.05, 10.0)] * 3),
    origin=st.tuples(*[st.floats(-1000.0, 1000.0)] * 3),
)
def test_geometry_round_trip_exact_in_double_precision_formats(
    tmp_path_factory: pytest.TempPathFactory, ext: str, angles, spacing, origin
) -> None:
    geometry = Geometry(spacing, origin, tuple(rotation(*angles).ravel()))
    like = Volume(np.zeros((2, 3, 4), np.int16), geometry)
    path = write_labels(np.ones((2, 3, 4), np.uint8), like, tmp_path_factory.mktemp("g") / f"l{ext}")
    assert_same_geometry(read_volume(path).geometry, geometry, ext)


@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.float64, np.uint32, np.int64])
@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".mhd"])
def test_write_volume_keeps_image_values(tmp_path: Path, ext: str, dtype: type) -> None:
    rng = np.random.default_rng(3)
    array = (rng.normal(size=(5, 6, 7)) * 1000).astype(dtype)
    volume = Volume(array, OBLIQUE)
    back = read_volume(write_volume(volume, tmp_path / f"img{ext}"))
    assert back.array.dtype == dtype
    np.testing.assert_array_equal(back.array, array)


def test_bool_labels_become_uint8(tmp_path: Path) -> None:
    like = Volume(np.zeros((3, 4, 5), np.int16), OBLIQUE)
    mask = np.zeros(like.shape, bool)
    mask[1, 2, 3] = True
    back = read_volume(write_labels(mask, like, tmp_path / "m.nrrd"))
    assert back.array.dtype == np.uint8 and back.array.sum() == 1 and back.array[1, 2, 3] == 1


def test_compressed_where_the_format_allows(tmp_path: Path) -> None:
    like = Volume(np.zeros((10, 20, 30), np.int16), OBLIQUE)
    labels = np.zeros(like.shape, np.uint16)
    for ext in VOLUME_EXTENSIONS:
        write_labels(labels, like, tmp_path / f"l{ext}")
    with gzip.open(tmp_path / "l.nii.gz") as fh:
        assert len(fh.read()) > (tmp_path / "l.nii.gz").stat().st_size
    assert (tmp_path / "l.nii").stat().st_size >= labels.nbytes  # NIfTI has no compressed .nii
    assert b"encoding: gzip" in (tmp_path / "l.nrrd").read_bytes()[:2000]
    assert b"CompressedData = True" in (tmp_path / "l.mha").read_bytes()[:2000]
    assert "data file: l.raw.gz" in (tmp_path / "l.nhdr").read_text()
    assert "ElementDataFile = l.zraw" in (tmp_path / "l.mhd").read_text()
    assert (tmp_path / "l.zraw").stat().st_size < labels.nbytes / 10


def test_overwrite_replaces_the_file(tmp_path: Path) -> None:
    like = Volume(np.zeros((3, 4, 5), np.int16), OBLIQUE)
    path = write_labels(np.ones(like.shape, np.uint8), like, tmp_path / "l.mhd")
    write_labels(np.full(like.shape, 9, np.uint8), like, path)
    assert np.all(read_volume(path).array == 9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.mhd", "l.zraw"]


def test_nii_gz_is_read_even_next_to_a_nii_of_the_same_name(tmp_path: Path) -> None:
    # ITK's NIfTI library would silently read scan.nii when asked for scan.nii.gz
    like = Volume(np.zeros((3, 4, 5), np.int16), OBLIQUE)
    write_labels(np.full(like.shape, 1, np.uint8), like, tmp_path / "scan.nii.gz")
    write_labels(np.full(like.shape, 2, np.uint8), like, tmp_path / "scan.nii")
    assert np.all(read_volume(tmp_path / "scan.nii.gz").array == 1)
    assert np.all(read_volume(tmp_path / "scan.nii").array == 2)


def test_array_is_writable_and_owns_its_image(tmp_path: Path) -> None:
    like = Volume(np.zeros((3, 4, 5), np.int16), OBLIQUE)
    path = write_labels(np.arange(60, dtype=np.uint8).reshape(3, 4, 5), like, tmp_path / "l.mha")
    view = read_volume(path).array[1]  # the Volume and its array are dropped; the view must stay valid
    view[0, 0] = 200
    np.testing.assert_array_equal(view[0, 1:], np.arange(21, 25))
    assert view[0, 0] == 200


def test_modality_from_nrrd_and_metaimage_headers(tmp_path: Path) -> None:
    image = sitk.GetImageFromArray(np.zeros((2, 3, 4), np.int16))
    image.SetMetaData("modality", "CT")
    sitk.WriteImage(image, str(tmp_path / "ct.nrrd"))
    assert read_volume(tmp_path / "ct.nrrd").modality == "CT"
    (tmp_path / "mr.mha").write_bytes(
        b"ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nModality = MET_MOD_MR\n"
        b"ElementType = MET_UCHAR\nElementDataFile = LOCAL\n" + bytes(8)
    )
    assert read_volume(tmp_path / "mr.mha").modality == "MR"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 4), np.int16)), str(tmp_path / "plain.nrrd"))
    assert read_volume(tmp_path / "plain.nrrd").modality is None


# --- real data ---------------------------------------------------------------------------


def round_trip_labels(volume: Volume, tmp_path: Path) -> None:
    labels = (volume.array > -200).astype(np.uint8) + (volume.array > 300).astype(np.uint8)
    assert 0 < labels.sum() < 2 * labels.size
    for ext in VOLUME_EXTENSIONS:
        back = read_volume(write_labels(labels, volume, tmp_path / f"labels{ext}"))
        np.testing.assert_array_equal(back.array, labels)
        assert back.array.dtype == np.uint8
        assert back.geometry.isclose(volume.geometry, atol=1e-6), ext


def test_real_nifti_keeps_flipped_direction(totalseg: Path, tmp_path: Path) -> None:
    volume = read_volume(totalseg / "example_ct.nii.gz")
    assert volume.shape == (112, 101, 122)
    assert volume.geometry.spacing == pytest.approx((3.0, 3.0, 3.0))
    # not canonicalised: the file's own direction cosines, x and y flipped in LPS
    assert volume.geometry.direction == (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    assert volume.geometry.origin == pytest.approx((177.95632934570312, -11.319000244140625, 94.3017578125))
    assert volume.modality is None and volume.dicom is None
    round_trip_labels(volume, tmp_path)


def test_real_dicom_labels_round_trip(dicom_series: Path, tmp_path: Path) -> None:
    volume = read_volume(dicom_series)
    round_trip_labels(volume, tmp_path)
