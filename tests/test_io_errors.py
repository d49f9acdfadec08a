"""read_volume / write_labels refuse bad input with VolumeReadError / VolumeWriteError."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from napari_medmamba.io import (
    Geometry,
    Volume,
    VolumeReadError,
    VolumeWriteError,
    read_volume,
    write_labels,
    write_volume,
)


def small_volume(shape: tuple[int, int, int] = (4, 5, 6)) -> Volume:
    array = np.arange(np.prod(shape), dtype=np.int16).reshape(shape)
    return Volume(array, Geometry((0.5, 0.75, 2.0), (10.0, -20.0, 30.0)))


def read_error(path: Path, **kwargs) -> VolumeReadError:
    with pytest.raises(VolumeReadError) as info:
        read_volume(path, **kwargs)
    assert str(path) in str(info.value)
    assert info.value.path == Path(path)
    return info.value


# --- reading -------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    error = read_error(tmp_path / "nope.nii.gz")
    assert "no such file" in error.problem


def test_empty_folder(tmp_path: Path) -> None:
    assert "empty" in read_error(tmp_path).problem


def test_folder_without_dicom(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a scan")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    assert "no DICOM image files" in read_error(tmp_path).problem


def test_unsupported_extension(tmp_path: Path) -> None:
    path = tmp_path / "scan.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    problem = read_error(path).problem
    assert "unsupported file type '.png'" in problem and ".nii.gz" in problem


def test_text_file_named_nii(tmp_path: Path) -> None:
    path = tmp_path / "fake.nii"
    path.write_text("this is a text file, not a NIfTI header\n" * 20)
    assert "not a readable .nii file" in read_error(path).problem


@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
def test_truncated_nifti(tmp_path: Path, ext: str) -> None:
    path = write_volume(small_volume((20, 30, 40)), tmp_path / f"scan{ext}")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    assert "truncated" in read_error(path).problem


def test_truncated_real_nii_gz(totalseg: Path, tmp_path: Path) -> None:
    data = (totalseg / "example_ct.nii.gz").read_bytes()
    path = tmp_path / "example_ct.nii.gz"
    path.write_bytes(data[: len(data) // 2])
    assert "truncated" in read_error(path).problem


@pytest.mark.parametrize("ext", [".nrrd", ".mha"])
def test_truncated_other_formats(tmp_path: Path, ext: str) -> None:
    path = write_volume(small_volume((20, 30, 40)), tmp_path / f"scan{ext}")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    assert "could not be read" in read_error(path).problem


def test_2d_image(tmp_path: Path) -> None:
    path = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.Image(5, 6, sitk.sitkInt16), str(path))
    assert "2D image" in read_error(path).problem


def test_4d_image(tmp_path: Path) -> None:
    path = tmp_path / "series.nii.gz"
    sitk.WriteImage(sitk.Image([5, 6, 7, 3], sitk.sitkInt16), str(path))
    assert "4D image (5 x 6 x 7 x 3)" in read_error(path).problem


def test_rgb_nifti(totalseg: Path) -> None:
    path = totalseg / "spine_report" / "example_ct_report" / "spine_report.nii.gz"
    assert "3 values per voxel" in read_error(path).problem


def test_zero_size_axis_nifti(tmp_path: Path) -> None:
    path = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 0, 3), np.int16), np.eye(4)), path)
    assert "axis of size 0" in read_error(path).problem


def test_zero_size_axis_metaimage(tmp_path: Path) -> None:
    path = tmp_path / "empty.mha"
    path.write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 4 0 3\nElementType = MET_SHORT\nElementDataFile = LOCAL\n"
    )
    assert "axis of size 0" in read_error(path).problem


def huge_header(tmp_path: Path) -> Path:
    """A header promising 10**13 voxels whose data file does not exist."""
    path = tmp_path / "huge.mhd"
    path.write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 100000 100000 1000\n"
        "ElementType = MET_SHORT\nElementDataFile = huge.raw\n"
    )
    return path


def test_voxel_limit_is_checked_before_pixel_data(tmp_path: Path) -> None:
    # the data file is missing, so any attempt to read pixels would fail differently
    problem = read_error(huge_header(tmp_path)).problem
    assert "exceed the limit of 2,147,483,648" in problem and "MEDMAMBA_MAX_VOXELS" in problem


def test_voxel_limit_argument_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_volume(small_volume((4, 5, 6)), tmp_path / "scan.nrrd")
    assert read_volume(path, max_voxels=120).shape == (4, 5, 6)
    assert "exceed the limit of 119" in read_error(path, max_voxels=119).problem
    monkeypatch.setenv("MEDMAMBA_MAX_VOXELS", "100")
    assert "exceed the limit of 100" in read_error(path).problem
    assert read_volume(path, max_voxels=1000).shape == (4, 5, 6)
    monkeypatch.setenv("MEDMAMBA_MAX_VOXELS", "lots")
    with pytest.raises(ValueError, match="MEDMAMBA_MAX_VOXELS"):
        read_volume(path)


def test_series_argument_needs_dicom(tmp_path: Path) -> None:
    path = write_volume(small_volume(), tmp_path / "scan.mha")
    assert "DICOM only" in read_error(path, series="1.2.3").problem


def test_errors_are_oserror_and_valueerror_and_pickle(tmp_path: Path) -> None:
    error = VolumeReadError(tmp_path / "x.nii", "broken")
    assert isinstance(error, OSError) and isinstance(error, ValueError)
    again = pickle.loads(pickle.dumps(error))
    assert (type(again), again.path, again.problem, str(again)) == (VolumeReadError, error.path, "broken", str(error))
    assert str(VolumeWriteError("a.nrrd", "full disk")) == "cannot write 'a.nrrd': full disk"


# --- writing -------------------------------------------------------------------------


def write_error(labels: np.ndarray, like: Volume, path: Path) -> VolumeWriteError:
    with pytest.raises(VolumeWriteError) as info:
        write_labels(labels, like, path)
    assert str(path) in str(info.value)
    assert not path.exists()
    return info.value


def test_write_refuses_float_labels(tmp_path: Path) -> None:
    like = small_volume()
    problem = write_error(np.zeros(like.shape, np.float32), like, tmp_path / "l.nii.gz").problem
    assert "integers" in problem and "float32" in problem


def test_write_refuses_negative_labels(tmp_path: Path) -> None:
    like = small_volume()
    labels = np.zeros(like.shape, np.int16)
    labels[1, 2, 3] = -4
    assert "negative (minimum -4)" in write_error(labels, like, tmp_path / "l.nrrd").problem


def test_write_refuses_other_shape(tmp_path: Path) -> None:
    like = small_volume((4, 5, 6))
    assert "(4, 5, 7)" in write_error(np.zeros((4, 5, 7), np.uint8), like, tmp_path / "l.mha").problem


def test_write_refuses_unknown_extension(tmp_path: Path) -> None:
    like = small_volume()
    assert "unsupported extension" in write_error(np.zeros(like.shape, np.uint8), like, tmp_path / "l.tif").problem


def test_write_refuses_missing_folder(tmp_path: Path) -> None:
    like = small_volume()
    path = tmp_path / "missing" / "l.nii.gz"
    assert "does not exist" in write_error(np.zeros(like.shape, np.uint8), like, path).problem


def test_write_refuses_a_file_as_folder(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    like = small_volume()
    write_error(np.zeros(like.shape, np.uint8), like, tmp_path / "file" / "l.nii.gz")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a non-root POSIX user")
def test_write_refuses_read_only_folder(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        like = small_volume()
        assert "not writable" in write_error(np.zeros(like.shape, np.uint8), like, folder / "l.nii.gz").problem
    finally:
        folder.chmod(0o700)


@pytest.mark.parametrize("ext", [".nii.gz", ".mhd", ".nhdr"])
def test_failed_write_leaves_old_files_and_no_debris(tmp_path: Path, ext: str, monkeypatch: pytest.MonkeyPatch) -> None:
    like = small_volume()
    path = write_labels(np.ones(like.shape, np.uint8), like, tmp_path / f"l{ext}")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_write = sitk.WriteImage

    def crash_half_way(image: sitk.Image, name: str, *args, **kwargs) -> None:
        real_write(image, name, *args, **kwargs)
        for written in Path(name).parent.iterdir():  # leave half-written files, then fail
            written.write_bytes(written.read_bytes()[:10])
        raise RuntimeError("ITK ERROR: disk full")

    monkeypatch.setattr(sitk, "WriteImage", crash_half_way)
    with pytest.raises(VolumeWriteError, match="disk full"):
        write_labels(np.full(like.shape, 2, np.uint8), like, path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    monkeypatch.setattr(sitk, "WriteImage", real_write)
    assert np.all(read_volume(path).array == 1)


def test_write_into_folder_name(tmp_path: Path) -> None:
    like = small_volume()
    (tmp_path / "l.nii.gz").mkdir()
    with pytest.raises(VolumeWriteError, match="a folder with that name exists"):
        write_labels(np.zeros(like.shape, np.uint8), like, tmp_path / "l.nii.gz")
    assert list((tmp_path / "l.nii.gz").iterdir()) == []
