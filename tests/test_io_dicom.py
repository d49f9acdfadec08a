"""DICOM series reading: choice of series, slice order, HU, header checks, DicomInfo."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import generate_uid

from napari_medmamba.io import Volume, VolumeReadError, read_volume


@pytest.fixture(scope="module")
def ct(dicom_series: Path) -> Volume:
    """The real series read once per module (decoding JPEG 2000 takes about a second)."""
    return read_volume(dicom_series)


def sitk_reference(folder: Path) -> sitk.Image:
    """The series as SimpleITK reads it on its own."""
    reader = sitk.ImageSeriesReader()
    (series_id,) = reader.GetGDCMSeriesIDs(str(folder))
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), series_id))
    return reader.Execute()


def copy_series(source: Path, target: Path, edit=None, keep=None) -> list[Path]:
    """Copy the files of ``source`` (optionally a subset, optionally edited) into ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    files = sorted(source.iterdir())
    out = []
    for i, path in enumerate(files):
        if keep is not None and i not in keep:
            continue
        if edit is None:
            out.append(Path(shutil.copy(path, target / path.name)))
            continue
        ds = pydicom.dcmread(path)
        edit(i, ds)
        ds.save_as(target / path.name)
        out.append(target / path.name)
    return out


def test_real_series_matches_simpleitk_and_is_hu(ct: Volume, dicom_series: Path) -> None:
    volume = ct
    reference = sitk_reference(dicom_series)
    assert volume.shape == (20, 512, 512)
    assert volume.array.dtype == np.int16
    np.testing.assert_array_equal(volume.array, sitk.GetArrayViewFromImage(reference))
    assert volume.geometry.spacing == pytest.approx((0.9765625, 0.9765625, 2.0), abs=1e-9)
    np.testing.assert_allclose(volume.geometry.origin, reference.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(volume.geometry.direction, reference.GetDirection(), atol=1e-6)
    # stored pixels are unsigned (PixelRepresentation 0) with intercept -1024: negatives prove rescaling
    assert volume.array.min() == -1024
    corner_air = volume.array[:, :40, :40]
    assert -1100 < float(np.median(corner_air)) < -900
    assert volume.modality == "CT"


def test_dicom_info_in_array_order(ct: Volume) -> None:
    volume = ct
    info = volume.dicom
    assert info is not None and len(info.files) == len(info.sop_instance_uids) == 20
    z = []
    for path, uid in zip(info.files, info.sop_instance_uids):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert uid == (ds.SOPInstanceUID or ds.file_meta.MediaStorageSOPInstanceUID)
        z.append(float(ds.ImagePositionPatient[2]))
    assert z[0] == pytest.approx(volume.geometry.origin[2])
    assert np.allclose(np.diff(z), 2.0)
    assert info.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    assert info.frame_of_reference_uid == "1.3.12.2.1107.5.1.4.60064.30000022120807274275100000041"
    assert info.modality == "CT" and info.series_description == "CT Body 3.0"
    assert info.study["StudyDate"] == "20221208"
    assert set(info.patient) == {"PatientName", "PatientID", "PatientBirthDate", "PatientSex"}
    assert set(info.study) == {"StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName"}


def test_reading_one_file_reads_its_series(dicom_series: Path) -> None:
    first = sorted(dicom_series.iterdir())[0]
    volume = read_volume(first)
    assert volume.shape == (20, 512, 512) and volume.path == dicom_series


@pytest.fixture
def two_series(dicom_series: Path, tmp_path: Path) -> tuple[Path, str, list[Path]]:
    """The real 20-slice series plus a 10-slice copy with new Series/SOP Instance UIDs."""
    folder = tmp_path / "two"
    copy_series(dicom_series, folder)
    new_uid = generate_uid()

    def renamed(i: int, ds: pydicom.Dataset) -> None:
        ds.SeriesInstanceUID = new_uid
        ds.SeriesDescription = "modified copy"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()

    staging = tmp_path / "staging"
    copies = copy_series(dicom_series, staging, edit=renamed, keep=range(5, 15))
    moved = [Path(shutil.move(p, folder / f"copy_{p.name}")) for p in copies]
    return folder, new_uid, moved


def test_two_series_default_is_largest_and_logs_the_other(two_series, caplog) -> None:
    folder, new_uid, _ = two_series
    with caplog.at_level(logging.WARNING, logger="napari_medmamba.io"):
        volume = read_volume(folder)
    assert volume.shape == (20, 512, 512)
    assert volume.dicom.series_description == "CT Body 3.0"
    assert any(new_uid in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)


def test_two_series_choose_by_uid(two_series, ct: Volume) -> None:
    folder, new_uid, copies = two_series
    volume = read_volume(folder, series=new_uid)
    full = ct
    assert volume.shape == (10, 512, 512)
    assert volume.dicom.series_instance_uid == new_uid
    assert set(volume.dicom.files) == set(copies)
    # the copy holds file indices 5..14 in name order, which is descending z: array slices 5..14
    np.testing.assert_array_equal(volume.array, full.array[5:15])
    z0 = float(pydicom.dcmread(volume.dicom.files[0], stop_before_pixels=True).ImagePositionPatient[2])
    assert volume.geometry.origin[2] == pytest.approx(z0)


def test_two_series_file_picks_its_series(two_series) -> None:
    folder, new_uid, copies = two_series
    assert read_volume(copies[3]).dicom.series_instance_uid == new_uid


def test_unknown_series_uid_lists_available(two_series) -> None:
    folder, new_uid, _ = two_series
    with pytest.raises(VolumeReadError, match="no DICOM series with SeriesInstanceUID '1.2.3'") as info:
        read_volume(folder, series="1.2.3")
    assert new_uid in str(info.value) and "(no SeriesInstanceUID) (20 slices" in str(info.value)


def test_missing_slice_is_refused(dicom_series: Path, tmp_path: Path) -> None:
    copy_series(dicom_series, tmp_path, keep=[i for i in range(20) if i != 7])
    with pytest.raises(VolumeReadError, match="inconsistent slice spacing: 4 mm .* but 2 mm"):
        read_volume(tmp_path)


def test_duplicate_slice_is_refused(dicom_series: Path, tmp_path: Path) -> None:
    files = copy_series(dicom_series, tmp_path)
    shutil.copy(files[3], tmp_path / "duplicate.dcm")
    with pytest.raises(VolumeReadError, match="same position"):
        read_volume(tmp_path)


def test_mixed_orientation_is_refused(dicom_series: Path, tmp_path: Path) -> None:
    def tilt(i: int, ds: pydicom.Dataset) -> None:
        if i == 4:
            ds.ImageOrientationPatient = [1, 0, 0, 0, 0.9950042, -0.0998334]

    copy_series(dicom_series, tmp_path, edit=tilt)
    with pytest.raises(VolumeReadError, match="mixed ImageOrientationPatient"):
        read_volume(tmp_path)


def test_sideways_drift_is_refused(dicom_series: Path, tmp_path: Path) -> None:
    def shear(i: int, ds: pydicom.Dataset) -> None:
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.5 * i, z]  # gantry-tilt-like shear

    copy_series(dicom_series, tmp_path, edit=shear)
    with pytest.raises(VolumeReadError, match="drift"):
        read_volume(tmp_path)


def test_rescale_intercept_is_applied(dicom_series: Path, ct: Volume, tmp_path: Path) -> None:
    def shift(i: int, ds: pydicom.Dataset) -> None:
        ds.RescaleIntercept = "-1000"

    copy_series(dicom_series, tmp_path, edit=shift)
    np.testing.assert_array_equal(read_volume(tmp_path).array, ct.array + 24)


def test_per_slice_rescale_gives_float(dicom_series: Path, ct: Volume, tmp_path: Path) -> None:
    def halve(i: int, ds: pydicom.Dataset) -> None:
        if i == 5:
            ds.RescaleSlope = "0.5"

    copy_series(dicom_series, tmp_path, edit=halve)
    volume, original = read_volume(tmp_path), ct.array.astype(np.float64)
    assert volume.array.dtype == np.float32
    k = 19 - 5  # file 5 in name order is array slice 14 (names run against z)
    np.testing.assert_array_equal(volume.array[k], (original[k] + 1024) * 0.5 - 1024)
    np.testing.assert_array_equal(np.delete(volume.array, k, 0), np.delete(original, k, 0))


def test_voxel_limit_on_dicom(dicom_series: Path) -> None:
    with pytest.raises(VolumeReadError, match="exceed the limit of 5,242,879"):
        read_volume(dicom_series, max_voxels=512 * 512 * 20 - 1)
