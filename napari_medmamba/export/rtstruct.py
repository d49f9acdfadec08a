"""DICOM RT Structure Set (RTSTRUCT) export and import, with pydicom only.

An RTSTRUCT is what radiotherapy treatment-planning systems read: each structure (ROI) is a
stack of closed planar contours, one or more per image slice, in patient coordinates (mm,
DICOM LPS), each contour referencing the SOP instance of the slice it lies on.

:func:`export_rtstruct` writes a label map that lies on the grid of a DICOM series read with
``read_volume`` (``Volume.dicom`` lists the source files in array z order): one ROI per label
value present (ROI Number = the label value, ROI name = the label name, colour = the label
colour, interpreted type ORGAN). Contours are traced per slice and label with marching
squares at level 0.5 on the zero-padded binary slice, so they run through the midpoints
between inside and outside pixel centres; outer boundaries and hole boundaries are written
as separate contours, and a pixel belongs to the ROI when it lies inside an odd number of
the slice's contours (the even-odd convention of most planning systems).

:func:`rtstruct_to_labels` rasterises an RTSTRUCT back to a label map on a reference grid
with that same even-odd rule (pixel centres inside), so an export read back gives the same
mask.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..annotation.edit_log import EditLog
from ..atomic_write import atomic_write
from ..io.volume import Volume
from .dicom_source import (
    DicomSourceWarning,
    algorithm_type_for,
    deidentified_sources,
    prepared_labels,
    require_dicom_source,
    source_datasets,
)
from .errors import DicomSourceError, ExportError
from .label_table import LabelColors, LabelNames, label_names_dict

__all__ = [
    "RTSTRUCT_SOP_CLASS_UID",
    "RtStructWarning",
    "export_rtstruct",
    "rtstruct_roi_names",
    "rtstruct_to_labels",
    "slice_contours",
]

RTSTRUCT_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.481.3"
"""RT Structure Set Storage."""
_STUDY_SOP_CLASS_UID = "1.2.840.10008.3.1.2.3.1"
"""Referenced SOP Class of RTReferencedStudySequence items, as planning systems write it."""

_PATIENT_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")
_STUDY_KEYWORDS = ("StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
                   "AccessionNumber")
_DEIDENTIFIED_KEYWORDS = ("PatientIdentityRemoved", "DeidentificationMethod")
"""Copied from de-identified source headers only (``deidentify=True``)."""

_PLANE_TOLERANCE_MM = 1e-4


class RtStructWarning(DicomSourceWarning):
    """The source series lacks an identifier the RTSTRUCT needs; a derived one is used."""


# ---- contours ----------------------------------------------------------------------------------------------


def _drop_collinear(points: np.ndarray) -> np.ndarray:
    """Drop repeated points and vertices lying on the straight line between their neighbours (closed polygon)."""
    if len(points) < 3:
        return points
    keep = np.any(np.abs(points - np.roll(points, 1, axis=0)) > 1e-9, axis=1)
    points = points[keep]
    if len(points) < 3:
        return points
    before = points - np.roll(points, 1, axis=0)
    after = np.roll(points, -1, axis=0) - points
    cross = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]
    dot = np.sum(before * after, axis=1)
    return points[~((np.abs(cross) < 1e-9) & (dot > 0))]


def slice_contours(mask: np.ndarray, simplify: float = 0.0) -> list[np.ndarray]:
    """Closed contours of a 2D binary ``mask``: outer boundaries and holes alike.

    Each contour is a ``(n, 2)`` array of (row, column) pixel coordinates, n >= 3, without
    the first point repeated at the end. Contours run through the midpoints between inside
    and outside pixel centres (marching squares at level 0.5 on the zero-padded mask, with
    diagonal-only neighbours kept apart), so the even-odd fill of all contours gives back
    ``mask`` exactly. Points on straight runs are dropped (lossless). ``simplify`` > 0 (in
    pixels) further simplifies with Douglas-Peucker (skimage ``approximate_polygon``): below
    about 0.35 px the pixel staircase is kept (still lossless); 0.5 px halves the points of
    organ contours and keeps the round trip at Dice >= 0.998 on the test CT.
    """
    from skimage.measure import approximate_polygon, find_contours

    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"slice_contours needs a 2D mask, got shape {mask.shape}")
    if not mask.any():
        return []
    padded = np.pad(mask, 1).astype(np.float32)
    out = []
    for contour in find_contours(padded, 0.5):
        contour = contour - 1.0
        if len(contour) > 1 and np.allclose(contour[0], contour[-1]):
            contour = contour[:-1]
        contour = _drop_collinear(contour)
        if simplify > 0 and len(contour) > 3:
            closed = approximate_polygon(np.vstack([contour, contour[:1]]), float(simplify))
            if len(closed) - 1 >= 3:
                contour = closed[:-1]
        if len(contour) >= 3:
            out.append(contour)
    return out


def _ds_text(values: np.ndarray) -> list[str]:
    """Decimal strings (VR DS, at most 16 characters) with 0.1 micrometre resolution."""
    out = []
    for value in np.round(values.ravel(), 4):
        text = f"{value:.4f}".rstrip("0").rstrip(".")
        out.append("0" if text in ("-0", "") else text)
    return out


def _slice_planes(sources: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """(positions (z, 3), unit normals (z, 3)) of the source slices from their headers."""
    positions, normals = [], []
    for ds in sources:
        orientation = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=float)
        normal = np.cross(orientation[:3], orientation[3:])
        normals.append(normal / np.linalg.norm(normal))
        positions.append([float(v) for v in ds.ImagePositionPatient])
    return np.asarray(positions, dtype=float), np.asarray(normals, dtype=float)


# ---- export ------------------------------------------------------------------------------------------------


def _item(**values: Any) -> Any:
    from pydicom.dataset import Dataset

    ds = Dataset()
    for key, value in values.items():
        setattr(ds, key, value)
    return ds


def _roi_names(values: list[int], names: dict[int, str]) -> dict[int, str]:
    """Unique ROI names (planning systems require them), at most 64 characters."""
    out: dict[int, str] = {}
    used: set[str] = set()
    for value in values:
        name = (names.get(value) or f"label {value}").strip() or f"label {value}"
        name = name[:64]
        if name.lower() in used:
            name = f"{name[:55]} ({value})"
        used.add(name.lower())
        out[value] = name
    return out


def export_rtstruct(
    labels: np.ndarray,
    source: Volume,
    path: str | PathLike[str],
    label_names: LabelNames = None,
    label_colors: LabelColors = None,
    deidentify: bool = False,
    *,
    pseudonym: str | None = None,
    model_name: str = "napari-medmamba",
    model_version: str = __version__,
    algorithm_type: str | None = None,
    edit_log: EditLog | None = None,
    simplify: float = 0.0,
    structure_set_label: str = "napari-medmamba",
    series_description: str = "napari-medmamba structures",
    series_number: int = 301,
    manufacturer: str = "napari-medmamba",
) -> Path:
    """Write ``labels`` (on ``source``'s grid) as a DICOM RTSTRUCT file at ``path``; returns the path.

    One ROI per label value present: ROI Number = label value, ROI Name = the label name
    (``label <v>`` when unnamed; made unique), ROI Display Color from ``label_colors``
    (0..1 or 0..255), RT ROI Interpreted Type ORGAN, ROI Generation Algorithm AUTOMATIC,
    SEMIAUTOMATIC (an ``edit_log`` with user edits) or MANUAL (``algorithm_type``).
    Contours: see :func:`slice_contours` (``simplify`` in pixels, default lossless); points
    are LPS millimetres computed through the scan's spacing, origin and direction, and lie
    on the plane of the source slice each contour references.

    The RTSTRUCT copies the source's patient (name, ID, birth date, sex) and study (Study
    Instance UID, date, time, ID, accession number, referring physician) and nothing else.
    ``deidentify=True`` takes them from :func:`napari_medmamba.privacy.deidentify_dataset`
    copies of the source headers instead, as :func:`export_dicom_seg` does: patient name
    ``pseudonym`` (default "ANONYMOUS"), patient ID ``pseudonym`` (default empty), study
    identifiers emptied, and all UIDs (study, series, frame of reference, referenced SOP
    instances) replaced by new, randomly salted ones.

    Raises :class:`DicomSourceError` when ``source`` is not a DICOM series (or its files
    changed), :class:`ExportError` for other problems (empty label map, wrong shape ...).
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import (
        PYDICOM_IMPLEMENTATION_UID,
        ExplicitVRLittleEndian,
        generate_uid,
    )

    path = Path(path)
    require_dicom_source(source, path, "RTSTRUCT")
    labels, colors, values = prepared_labels(labels, source, label_colors, path, "structure")
    if max(values) > 2**31 - 1:
        raise ExportError(path, f"label value {max(values)} is too large for an ROI Number (at most 2^31 - 1)")
    algorithm_type = algorithm_type_for(algorithm_type, edit_log, path)
    sources = source_datasets(source, path, what="RTSTRUCT", category=RtStructWarning)
    if deidentify:
        sources = deidentified_sources(sources, pseudonym)
    first = sources[0]
    frame_uid = str(first.FrameOfReferenceUID)
    series_uid = str(first.SeriesInstanceUID)
    study_uid = str(first.StudyInstanceUID)

    # the grid (geometry) must place each slice on its source image's plane
    matrix = source.geometry.index_to_physical_matrix()
    positions, normals = _slice_planes(sources)
    slice_gap = float(np.linalg.norm(matrix[:3, 2]))
    shifts = np.zeros((len(sources), 3))
    for z in range(len(sources)):
        corner = matrix[:3, 3] + z * matrix[:3, 2]
        offset = float((corner - positions[z]) @ normals[z])
        if abs(offset) > 0.25 * slice_gap:
            raise DicomSourceError(source.dicom.files[z],
                                   f"slice {z} lies {offset:.3f} mm off the grid of the series; cannot place contours")
        if abs(offset) > _PLANE_TOLERANCE_MM:
            shifts[z] = -offset * normals[z]  # onto the source image's own plane

    names = _roi_names(values, label_names_dict(label_names))
    image_refs = [(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in sources]

    ds = pydicom.Dataset()
    sop_uid = generate_uid()
    now = datetime.datetime.now()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.SOPClassUID = RTSTRUCT_SOP_CLASS_UID
    ds.SOPInstanceUID = sop_uid
    # patient and general study modules: the source's identifiers, nothing else
    for keyword in _PATIENT_KEYWORDS + _STUDY_KEYWORDS:
        setattr(ds, keyword, first.get(keyword, "") or "")
    ds.StudyInstanceUID = study_uid
    if deidentify:
        for keyword in _DEIDENTIFIED_KEYWORDS:
            if keyword in first:
                setattr(ds, keyword, first.get(keyword))
    # RT series and general equipment
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = int(series_number)
    ds.SeriesDescription = series_description[:64]
    ds.OperatorsName = ""
    ds.Manufacturer = manufacturer[:64]
    ds.ManufacturerModelName = model_name[:64]
    ds.SoftwareVersions = f"napari-medmamba {__version__}"[:64]
    ds.InstanceNumber = 1
    # structure set
    ds.StructureSetLabel = structure_set_label[:16] or "STRUCTURES"
    ds.StructureSetName = structure_set_label[:64]
    ds.StructureSetDate = now.strftime("%Y%m%d")
    ds.StructureSetTime = now.strftime("%H%M%S")
    contour_images = [_item(ReferencedSOPClassUID=c, ReferencedSOPInstanceUID=i) for c, i in image_refs]
    series_item = _item(SeriesInstanceUID=series_uid, ContourImageSequence=contour_images)
    study_item = _item(ReferencedSOPClassUID=_STUDY_SOP_CLASS_UID, ReferencedSOPInstanceUID=study_uid,
                       RTReferencedSeriesSequence=[series_item])
    ds.ReferencedFrameOfReferenceSequence = [
        _item(FrameOfReferenceUID=frame_uid, RTReferencedStudySequence=[study_item])
    ]

    description = f"{model_name} {model_version}"[:64] if algorithm_type != "MANUAL" else "manual"
    roi_items, contour_items, observation_items = [], [], []
    for number, value in enumerate(values, start=1):
        roi_items.append(_item(ROINumber=value, ReferencedFrameOfReferenceUID=frame_uid, ROIName=names[value],
                               ROIGenerationAlgorithm=algorithm_type, ROIGenerationDescription=description))
        contours = []
        planes = np.flatnonzero((labels == value).any(axis=(1, 2)))
        for z in planes:
            for points in slice_contours(labels[z] == value, simplify=simplify):
                n = len(points)
                index = np.column_stack([points[:, 1], points[:, 0], np.full(n, float(z))])
                xyz = index @ matrix[:3, :3].T + matrix[:3, 3] + shifts[z]
                sop_class, sop_instance = image_refs[z]
                contours.append(_item(
                    ContourImageSequence=[_item(ReferencedSOPClassUID=sop_class,
                                                ReferencedSOPInstanceUID=sop_instance)],
                    ContourGeometricType="CLOSED_PLANAR",
                    NumberOfContourPoints=n,
                    ContourNumber=len(contours) + 1,
                    ContourData=_ds_text(xyz),
                ))
        roi_contour = _item(ReferencedROINumber=value, ContourSequence=contours)
        if value in colors:
            roi_contour.ROIDisplayColor = [int(c) for c in colors[value]]
        contour_items.append(roi_contour)
        observation_items.append(_item(ObservationNumber=number, ReferencedROINumber=value,
                                       RTROIInterpretedType="ORGAN", ROIInterpreter=""))
    ds.StructureSetROISequence = roi_items
    ds.ROIContourSequence = contour_items
    ds.RTROIObservationsSequence = observation_items

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTSTRUCT_SOP_CLASS_UID
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"MEDMAMBA_{__version__}"[:16]
    ds.file_meta = meta

    def write(fh: Any) -> None:
        if int(pydicom.__version__.split(".")[0]) >= 3:
            ds.save_as(fh, enforce_file_format=True)
        else:  # pragma: no cover - pydicom 2.x
            ds.is_little_endian, ds.is_implicit_VR = True, False
            ds.save_as(fh, write_like_original=False)

    try:
        return atomic_write(path, write)
    except OSError as exc:
        raise ExportError(path, str(exc.strerror or exc)) from None


# ---- import ------------------------------------------------------------------------------------------------


def _read(path_or_dataset: Any) -> Any:
    import pydicom

    ds = path_or_dataset
    if not isinstance(ds, pydicom.Dataset):
        ds = pydicom.dcmread(Path(path_or_dataset))
    sop_class = str(ds.get("SOPClassUID", "") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", ""))
    if ds.get("Modality") != "RTSTRUCT" and sop_class != RTSTRUCT_SOP_CLASS_UID:
        where = getattr(ds, "filename", None) or "the dataset"
        raise ValueError(f"{where} is not an RTSTRUCT (Modality {ds.get('Modality')!r}, SOP Class {sop_class!r})")
    return ds


def rtstruct_roi_names(path_or_dataset: Any) -> dict[int, str]:
    """``{ROI Number: ROI Name}`` of an RTSTRUCT file or pydicom dataset."""
    ds = _read(path_or_dataset)
    return {int(item.ROINumber): str(item.get("ROIName", "")) for item in ds.get("StructureSetROISequence", [])}


def rtstruct_to_labels(
    path_or_dataset: str | PathLike[str] | Any,
    reference: Volume,
    roi_values: Mapping[str, int] | None = None,
) -> np.ndarray:
    """Rasterise an RTSTRUCT's closed planar contours to a (z, y, x) label map on ``reference``'s grid.

    Each ROI is filled with its ROI Number (an RTSTRUCT from :func:`export_rtstruct` gives
    back the original label values), or, with ``roi_values`` ``{ROI name: value}``, only the
    named ROIs with those values. A contour goes to the slice whose SOP instance it
    references when that is one of ``reference.dicom``'s, else to the slice nearest its
    points; per slice and ROI a pixel is inside when its centre lies inside an odd number
    of the ROI's contours (even-odd: holes are contours inside contours). Later ROIs
    overwrite earlier ones where they overlap; points outside the grid are clipped.
    Raises ``ValueError`` when the file is not an RTSTRUCT.
    """
    from skimage.draw import polygon

    ds = _read(path_or_dataset)
    names = {int(item.ROINumber): str(item.get("ROIName", "")) for item in ds.get("StructureSetROISequence", [])}
    wanted: dict[int, int] = {}
    for number, name in names.items():
        if roi_values is None:
            wanted[number] = number
        elif name in roi_values:
            wanted[number] = int(roi_values[name])
    if roi_values is None:
        for item in ds.get("ROIContourSequence", []):
            number = int(item.ReferencedROINumber)
            wanted.setdefault(number, number)
    top = max(wanted.values(), default=0)
    dtype = np.uint8 if top <= 255 else np.uint16 if top <= 65535 else np.uint32
    shape = reference.shape
    out = np.zeros(shape, dtype=dtype)
    uid_index = {uid: z for z, uid in enumerate(reference.dicom.sop_instance_uids)} if reference.dicom else {}
    for item in ds.get("ROIContourSequence", []):
        value = wanted.get(int(item.ReferencedROINumber))
        if not value:
            continue
        per_slice: dict[int, np.ndarray] = {}
        for contour in item.get("ContourSequence", []):
            if contour.get("ContourGeometricType", "CLOSED_PLANAR") != "CLOSED_PLANAR":
                continue
            data = np.asarray([float(v) for v in contour.get("ContourData", [])], dtype=float)
            if data.size < 9:
                continue
            index = reference.geometry.physical_to_index(data.reshape(-1, 3))
            z = None
            for ref in contour.get("ContourImageSequence", []):
                z = uid_index.get(str(ref.get("ReferencedSOPInstanceUID", "")), z)
            if z is None:
                z = int(np.round(np.mean(index[:, 2])))
            if not 0 <= z < shape[0]:
                continue
            rr, cc = polygon(index[:, 1], index[:, 0], shape=shape[1:])
            mask = per_slice.setdefault(z, np.zeros(shape[1:], dtype=bool))
            mask[rr, cc] ^= True
        for z, mask in per_slice.items():
            out[z][mask] = value
    return out
