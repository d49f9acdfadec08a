"""Find, choose and check one DICOM image series in a folder (headers only, via pydicom).

Pixel data is left to SimpleITK; this module decides *which* files make up the volume,
in which order, and refuses series that cannot be one regular 3D grid.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from .errors import VolumeReadError
from .volume import DicomInfo

__all__ = ["DicomSeries", "find_dicom_series", "SPACING_TOLERANCE", "ORIENTATION_TOLERANCE"]

logger = logging.getLogger("napari_medmamba.io")

SPACING_TOLERANCE = 0.01
"""Largest allowed deviation of a slice gap from the median gap, as a fraction of it."""
ORIENTATION_TOLERANCE = 1e-4
"""Largest allowed difference between ImageOrientationPatient values of two slices."""
_ABS_TOLERANCE_MM = 1e-3

PATIENT_KEYS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")
STUDY_KEYS = ("StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName")


@dataclass
class _Slice:
    """The header fields of one image file that decide where it goes."""

    path: Path
    dataset: pydicom.Dataset
    position: np.ndarray
    orientation: np.ndarray

    @property
    def series_uid(self) -> str:
        return str(self.dataset.get("SeriesInstanceUID", "") or "")


@dataclass
class DicomSeries:
    """One checked series: its files in array z order and what the volume needs from them."""

    files: list[Path]
    info: DicomInfo
    shape: tuple[int, int, int]
    """(z, y, x) voxel counts, from the headers."""
    rescale_varies: bool
    """True when RescaleSlope/RescaleIntercept differ between slices."""


def _read_header(path: Path) -> _Slice | None:
    """The slice header of ``path``, or None when it is not a DICOM image with a position."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for _ in ds.iterall():  # decode every element now: malformed values raise here, not later
            pass
        if getattr(ds, "file_meta", None) is not None:
            for _ in ds.file_meta:
                pass
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, AttributeError):
        return None
    except Exception as error:  # hostile files: pydicom raises NotImplementedError, struct.error, MemoryError ...
        logger.debug("ignoring %s: malformed DICOM header (%s: %s)", path, type(error).__name__, error)
        return None
    if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds or "Rows" not in ds:
        logger.debug("ignoring %s: not a positioned DICOM image", path)
        return None
    try:
        position = np.array([float(v) for v in ds.ImagePositionPatient])
        orientation = np.array([float(v) for v in ds.ImageOrientationPatient])
    except (TypeError, ValueError):
        return None
    if position.shape != (3,) or orientation.shape != (6,):
        return None
    return _Slice(path, ds, position, orientation)


def _scan_folder(folder: Path) -> dict[str, list[_Slice]]:
    """Image slices in ``folder`` (not its subfolders), grouped by SeriesInstanceUID."""
    try:
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    except OSError as error:
        raise VolumeReadError(folder, f"the folder cannot be listed ({error.strerror or error})") from None
    if not files:
        raise VolumeReadError(folder, "the folder is empty")
    groups: dict[str, list[_Slice]] = {}
    for path in files:
        header = _read_header(path)
        if header is not None:
            groups.setdefault(header.series_uid, []).append(header)
    if not groups:
        raise VolumeReadError(
            folder, f"no DICOM image files among its {len(files)} files (and no .nii/.nrrd/.mha file was given)"
        )
    return groups


def _describe(uid: str, slices: list[_Slice]) -> str:
    description = str(slices[0].dataset.get("SeriesDescription", "") or "")
    name = uid or "(no SeriesInstanceUID)"
    return f"{name} ({len(slices)} slices{', ' + repr(description) if description else ''})"


def _choose(groups: dict[str, list[_Slice]], series: str | None, folder: Path) -> tuple[str, list[_Slice]]:
    """The requested series, or the one with most slices (ties: smallest UID)."""
    if series is not None:
        if series not in groups:
            available = "; ".join(_describe(uid, s) for uid, s in sorted(groups.items()))
            raise VolumeReadError(folder, f"no DICOM series with SeriesInstanceUID {series!r}; found {available}")
        chosen = series
    else:
        chosen = sorted(groups, key=lambda uid: (-len(groups[uid]), uid))[0]
    for uid, slices in sorted(groups.items()):
        if uid != chosen:
            logger.warning(
                "%s: skipped DICOM series %s; reading %s",
                folder,
                _describe(uid, slices),
                _describe(chosen, groups[chosen]),
            )
    return chosen, groups[chosen]


def _same_value(slices: list[_Slice], key: str, folder: Path) -> None:
    values = {str(s.dataset.get(key)) for s in slices}
    if len(values) > 1:
        raise VolumeReadError(folder, f"the slices of the series disagree on {key}: {sorted(values)}")


def _order(slices: list[_Slice], folder: Path) -> list[_Slice]:
    """Slices sorted along the slice normal; refuses mixed orientations, gaps, duplicates, tilt."""
    first = slices[0].orientation
    for s in slices[1:]:
        if np.max(np.abs(s.orientation - first)) > ORIENTATION_TOLERANCE:
            raise VolumeReadError(
                folder,
                f"mixed ImageOrientationPatient in one series: {list(first)} in {slices[0].path.name} "
                f"but {list(s.orientation)} in {s.path.name}",
            )
    for key in ("Rows", "Columns", "PixelSpacing", "SamplesPerPixel"):
        _same_value(slices, key, folder)
    normal = np.cross(first[:3], first[3:])
    ordered = sorted(slices, key=lambda s: float(s.position @ normal))
    if len(ordered) < 2:
        return ordered
    along = np.array([s.position @ normal for s in ordered])
    gaps = np.diff(along)
    median = float(np.median(gaps))
    tolerance = SPACING_TOLERANCE * median + _ABS_TOLERANCE_MM
    duplicate = np.flatnonzero(gaps <= _ABS_TOLERANCE_MM)
    if duplicate.size:
        i = int(duplicate[0])
        raise VolumeReadError(
            folder,
            f"two slices at the same position {along[i]:.3f} mm along the slice normal "
            f"({ordered[i].path.name}, {ordered[i + 1].path.name}); duplicates are not allowed",
        )
    irregular = np.flatnonzero(np.abs(gaps - median) > tolerance)
    if irregular.size:
        i = int(irregular[0])
        raise VolumeReadError(
            folder,
            f"inconsistent slice spacing: {gaps[i]:.4g} mm between {ordered[i].path.name} and "
            f"{ordered[i + 1].path.name}, but {median:.4g} mm elsewhere (missing or extra slices?)",
        )
    offsets = np.array([s.position - s.position @ normal * normal for s in ordered])
    drift = float(np.max(np.linalg.norm(offsets - offsets[0], axis=1)))
    if drift > tolerance:
        raise VolumeReadError(
            folder,
            f"slice positions drift {drift:.3g} mm sideways of the slice normal (gantry tilt?); "
            "such a series is not a regular grid and would need resampling",
        )
    return ordered


def _text(ds: pydicom.Dataset, key: str) -> str:
    value = ds.get(key)
    return "" if value is None else str(value)


def _info(slices: list[_Slice]) -> DicomInfo:
    first = slices[0].dataset
    meta = getattr(first, "file_meta", None)
    sop_class = _text(first, "SOPClassUID") or (_text(meta, "MediaStorageSOPClassUID") if meta else "")
    sop_instances = []
    for s in slices:
        uid = _text(s.dataset, "SOPInstanceUID")
        if not uid and getattr(s.dataset, "file_meta", None) is not None:
            uid = _text(s.dataset.file_meta, "MediaStorageSOPInstanceUID")
        sop_instances.append(uid)
    return DicomInfo(
        study_instance_uid=_text(first, "StudyInstanceUID"),
        series_instance_uid=_text(first, "SeriesInstanceUID"),
        frame_of_reference_uid=_text(first, "FrameOfReferenceUID") or None,
        sop_class_uid=sop_class or None,
        sop_instance_uids=sop_instances,
        files=[s.path for s in slices],
        modality=_text(first, "Modality") or None,
        patient={key: _text(first, key) for key in PATIENT_KEYS},
        study={key: _text(first, key) for key in STUDY_KEYS},
        series_description=_text(first, "SeriesDescription") or None,
    )


def find_dicom_series(folder: Path, series: str | None = None, like_file: Path | None = None) -> DicomSeries:
    """Choose and check one series in ``folder``.

    ``series`` selects by SeriesInstanceUID; else the series of ``like_file`` when given;
    else the series with most slices (the others are logged on "napari_medmamba.io").
    """
    folder = Path(folder)
    groups = _scan_folder(folder)
    if series is None and like_file is not None:
        header = _read_header(Path(like_file))
        if header is None:
            raise VolumeReadError(like_file, "not a DICOM image with ImagePositionPatient/ImageOrientationPatient")
        series = header.series_uid
    _, slices = _choose(groups, series, folder)
    frames = {int(s.dataset.get("NumberOfFrames", 1) or 1) for s in slices}
    if frames != {1}:
        raise VolumeReadError(folder, "multi-frame DICOM images are not supported; export the series as single frames")
    ordered = _order(slices, folder)
    rescale = {(_text(s.dataset, "RescaleSlope"), _text(s.dataset, "RescaleIntercept")) for s in ordered}
    ds = ordered[0].dataset
    return DicomSeries(
        files=[s.path for s in ordered],
        info=_info(ordered),
        shape=(len(ordered), int(ds.Rows), int(ds.Columns)),
        rescale_varies=len(rescale) > 1,
    )
