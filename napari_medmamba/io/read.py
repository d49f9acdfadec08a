"""Read a 3D scan (NIfTI, NRRD, MetaImage or a DICOM series) with its exact geometry."""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from os import PathLike
from pathlib import Path

import SimpleITK as sitk

from .dicom_series import find_dicom_series
from .errors import VolumeReadError, itk_message
from .formats import VOLUME_EXTENSIONS, is_dicom_file, volume_extension
from .limits import MAX_VOXELS_ENV, default_max_voxels
from .nifti_check import check_nifti_complete, check_nifti_geometry_finite
from .sitk_array import array_from_image
from .text_header import check_text_header
from .volume import Geometry, Volume

__all__ = ["read_volume"]

_MODALITIES = {"CT": "CT", "MR": "MR", "MET_MOD_CT": "CT", "MET_MOD_MR": "MR"}


def read_volume(path: str | PathLike[str], series: str | None = None, max_voxels: int | None = None) -> Volume:
    """Read a scan as a (z, y, x) :class:`Volume` with geometry exactly as SimpleITK gives it.

    ``path`` is a .nii/.nii.gz/.nrrd/.nhdr/.mha/.mhd file, a folder of DICOM files, or one
    DICOM file (its own series is read). ``series`` picks a DICOM series by
    SeriesInstanceUID; without it a folder yields the series with most slices.
    ``max_voxels`` (default: env ``MEDMAMBA_MAX_VOXELS`` or 2**31) is checked from the
    header before any pixel data is read. Nothing is reoriented or resampled.
    Raises :class:`VolumeReadError` naming the file and the problem.
    """
    path = Path(path)
    limit = default_max_voxels() if max_voxels is None else int(max_voxels)
    if not path.exists():
        raise VolumeReadError(path, "no such file or folder")
    if path.is_dir():
        return _read_dicom(path, series, limit)
    if not path.is_file():  # opening a FIFO would block forever; a device may never end
        raise VolumeReadError(path, "not a regular file (a pipe, socket or device cannot be read as a scan)")
    ext = volume_extension(path)
    if ext is None:
        if is_dicom_file(path):
            return _read_dicom(path.parent, series, limit, like_file=path)
        raise VolumeReadError(
            path,
            f"unsupported file type {path.suffix or '(no extension)'!r}; expected "
            f"{', '.join(VOLUME_EXTENSIONS)}, a DICOM file or a DICOM folder",
        )
    if series is not None:
        raise VolumeReadError(path, f"series={series!r} applies to DICOM only; this is a {ext} file")
    return _read_file(path, ext, limit)


def _check_grid(path: Path, size: tuple[int, ...], components: int, limit: int) -> None:
    """Refuse anything but a non-empty single-channel 3D grid within the voxel limit."""
    if components != 1:
        raise VolumeReadError(
            path, f"has {components} values per voxel (RGB or vector image); only single-channel scans can be read"
        )
    if len(size) != 3:
        shape = " x ".join(str(s) for s in size)
        raise VolumeReadError(path, f"is a {len(size)}D image ({shape}); a 3D volume is needed")
    if 0 in size:
        raise VolumeReadError(path, f"has an axis of size 0 (x, y, z size {tuple(size)})")
    voxels = math.prod(int(s) for s in size)  # exact: np.prod in int64 wraps to 0 for 2**31 per axis
    if voxels > limit:
        raise VolumeReadError(
            path,
            f"{voxels:,} voxels (x, y, z size {tuple(size)}) exceed the limit of {limit:,}; "
            f"raise it with max_voxels= or the {MAX_VOXELS_ENV} environment variable",
        )


def _header_modality(reader: sitk.ImageFileReader) -> str | None:
    """CT or MR when the header says so (MetaImage Modality, NRRD 'modality' field), else None."""
    for key in ("modality", "Modality"):
        if reader.HasMetaDataKey(key):
            value = _MODALITIES.get(reader.GetMetaData(key).strip().upper())
            if value:
                return value
    return None


@contextmanager
def _name_for_itk(path: Path, ext: str) -> Iterator[Path]:
    """A name under which ITK reads exactly ``path``.

    ITK's NIfTI library, asked for ``scan.nii.gz``, silently reads ``scan.nii`` instead
    when both exist; such a file is read through a symlink in a private folder.
    """
    if ext != ".nii.gz" or not path.with_name(path.name[:-3]).exists():
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="medmamba-read-") as private:
        link = Path(private) / path.name
        try:
            link.symlink_to(path.resolve())
        except OSError as error:
            raise VolumeReadError(
                path, f"{path.name[:-3]} next to it would be read instead; rename one of them ({error})"
            ) from None
        yield link


def _read_file(path: Path, ext: str, limit: int) -> Volume:
    with _name_for_itk(path, ext) as itk_path:
        return _read_file_as(path, itk_path, ext, limit)


def _read_file_as(path: Path, itk_path: Path, ext: str, limit: int) -> Volume:
    if ext in (".nrrd", ".nhdr", ".mha", ".mhd"):
        check_text_header(path, ext, limit)  # ITK crashes, overflows or hangs on some hostile headers
    elif ext in (".nii", ".nii.gz"):
        check_nifti_geometry_finite(path)  # ITK loops forever on an infinite sform
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(itk_path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise VolumeReadError(path, f"not a readable {ext} file ({itk_message(error)})") from None
    _check_grid(path, tuple(reader.GetSize()), reader.GetNumberOfComponents(), limit)
    if ext in (".nii", ".nii.gz"):
        check_nifti_complete(path)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        problem = f"pixel data could not be read; truncated or corrupt? ({itk_message(error)})"
        raise VolumeReadError(path, problem) from None
    return Volume(
        array=array_from_image(image),
        geometry=Geometry.from_sitk(image),
        path=path,
        modality=_header_modality(reader),
    )


def _read_dicom(folder: Path, series: str | None, limit: int, like_file: Path | None = None) -> Volume:
    found = find_dicom_series(folder, series, like_file=like_file)
    z, y, x = found.shape
    _check_grid(folder, (x, y, z), 1, limit)
    reader = sitk.ImageSeriesReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileNames([str(f) for f in found.files])
    if found.rescale_varies:
        reader.SetOutputPixelType(sitk.sitkFloat32)  # per-slice rescale must not be truncated
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise VolumeReadError(folder, f"DICOM pixel data could not be read ({itk_message(error)})") from None
    _check_grid(folder, tuple(image.GetSize()), image.GetNumberOfComponentsPerPixel(), limit)
    modality = found.info.modality
    return Volume(
        array=array_from_image(image),
        geometry=Geometry.from_sitk(image),
        path=folder,
        modality=modality if modality in ("CT", "MR") else None,
        dicom=found.info,
    )
