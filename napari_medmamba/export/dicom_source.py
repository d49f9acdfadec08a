"""What the DICOM exporters (DICOM-SEG, RTSTRUCT) share: the source series and its identifiers.

A DICOM export needs a label map on the grid of a DICOM series read with ``read_volume``
(``Volume.dicom`` lists the source files in array z order). These helpers check that,
re-read the source headers (checking they did not change), derive UIDs an anonymised
series lacks, de-identify the headers on request and pick the algorithm type.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..io.volume import DicomInfo, Volume
from .errors import DicomSourceError, ExportError
from .label_table import LabelColors, check_label_map, label_colors_dict, present_labels

__all__ = [
    "ALGORITHM_TYPES",
    "DicomSourceWarning",
    "algorithm_type_for",
    "deidentified_sources",
    "derived_source_uids",
    "prepared_labels",
    "require_dicom_source",
    "source_datasets",
]

ALGORITHM_TYPES = ("AUTOMATIC", "SEMIAUTOMATIC", "MANUAL")


class DicomSourceWarning(UserWarning):
    """The source series lacks an identifier a DICOM export needs; a derived one is used."""


def derived_source_uids(info: DicomInfo) -> dict[str, str]:
    """Study, series and frame-of-reference UIDs of the source, derived where missing.

    Anonymised series sometimes have empty UIDs; a SEG/RTSTRUCT must reference real ones, so
    a UID is derived deterministically from the SOP instance UIDs (the same series always
    gets the same derived UIDs).
    """
    from pydicom.uid import generate_uid

    sources = list(info.sop_instance_uids)
    out = {
        "StudyInstanceUID": info.study_instance_uid,
        "SeriesInstanceUID": info.series_instance_uid,
        "FrameOfReferenceUID": info.frame_of_reference_uid or "",
    }
    for key in out:
        if not out[key]:
            out[key] = str(generate_uid(entropy_srcs=["napari-medmamba", key, *sources]))
    return out


def require_dicom_source(source: Volume, path: Path, what: str) -> None:
    """Raise :class:`DicomSourceError` (naming ``path``) unless ``source`` was read from a DICOM series."""
    if source.dicom is None:
        where = f"{source.path}" if source.path is not None else "the source volume"
        raise DicomSourceError(
            path,
            f"{what} needs a DICOM source series, but {where} was not read from DICOM; "
            "export NIfTI/NRRD instead",
        )


def prepared_labels(
    labels: np.ndarray, source: Volume, label_colors: LabelColors, path: Path, what: str
) -> tuple[np.ndarray, dict[int, tuple[int, int, int]], list[int]]:
    """(checked labels, colours as 0..255 RGB, label values present); :class:`ExportError` when unusable/empty."""
    try:
        labels = check_label_map(labels, source.shape)
        colors = label_colors_dict(label_colors)
    except ValueError as exc:
        raise ExportError(path, str(exc)) from None
    values = present_labels(labels)
    if not values:
        raise ExportError(path, f"the label map is empty: there is no {what} to export")
    return labels, colors, values


def algorithm_type_for(algorithm_type: str | None, edit_log: Any, path: Path) -> str:
    """AUTOMATIC / SEMIAUTOMATIC / MANUAL; by default SEMIAUTOMATIC when ``edit_log`` shows user edits."""
    if algorithm_type is None:
        edited = edit_log is not None and any(e.kind not in ("model_run",) for e in edit_log.edits)
        algorithm_type = "SEMIAUTOMATIC" if edited else "AUTOMATIC"
    algorithm_type = algorithm_type.upper()
    if algorithm_type not in ALGORITHM_TYPES:
        raise ExportError(path, f"algorithm_type must be one of {', '.join(ALGORITHM_TYPES)}, got {algorithm_type!r}")
    return algorithm_type


def source_datasets(source: Volume, path: Path, *, what: str = "DICOM-SEG",
                    category: type[Warning] = DicomSourceWarning) -> list[Any]:
    """The source instances (headers only) in z order, with UIDs filled from the file meta or derived.

    Warns with ``category`` when the series lacks a Study/Series/Frame of Reference UID (the
    ``what`` export then references derived UIDs); raises :class:`DicomSourceError` when a
    file cannot be read or changed since the series was read.
    """
    import pydicom

    info = source.dicom
    assert info is not None
    if len(info.files) != source.shape[0]:
        raise DicomSourceError(path, f"the source lists {len(info.files)} DICOM files for {source.shape[0]} slices")
    uids = derived_source_uids(info)
    given = {
        "StudyInstanceUID": info.study_instance_uid,
        "SeriesInstanceUID": info.series_instance_uid,
        "FrameOfReferenceUID": info.frame_of_reference_uid,
    }
    missing = [key for key, value in given.items() if not value]
    if missing:
        warnings.warn(
            f"the source series has no {', '.join(missing)}; the {what} uses derived UIDs "
            f"({', '.join(uids[k] for k in missing)}) that other software will not recognise",
            category,
            stacklevel=3,
        )
    datasets = []
    for z, file in enumerate(info.files):
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=True)
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            raise DicomSourceError(file, f"cannot read the source DICOM file ({exc})") from None
        meta = getattr(ds, "file_meta", None)
        if not ds.get("SOPClassUID") and meta is not None:
            ds.SOPClassUID = meta.get("MediaStorageSOPClassUID", "")
        if not ds.get("SOPInstanceUID") and meta is not None:
            ds.SOPInstanceUID = meta.get("MediaStorageSOPInstanceUID", "")
        if z < len(info.sop_instance_uids) and str(ds.get("SOPInstanceUID", "")) != info.sop_instance_uids[z]:
            raise DicomSourceError(file, "the file changed since the series was read (SOP Instance UID differs)")
        if (int(ds.Rows), int(ds.Columns)) != source.shape[1:]:
            raise DicomSourceError(file, f"image size {ds.Rows}x{ds.Columns} differs from the grid {source.shape[1:]}")
        for key, value in uids.items():
            if not ds.get(key):
                setattr(ds, key, value)
        datasets.append(ds)
    return datasets


def deidentified_sources(sources: list[Any], pseudonym: str | None = None) -> list[Any]:
    """De-identified copies of the source headers, all through one :class:`~napari_medmamba.privacy.UidMap`.

    Patient name ``pseudonym`` (default "ANONYMOUS"), patient ID ``pseudonym`` (default
    empty), study identifiers emptied, every UID replaced consistently (references between
    the export and these copies stay intact, but match nothing of the original series).
    """
    from ..privacy import DEIDENTIFIED_PATIENT_NAME, UidMap, deidentify_dataset

    uid_map = UidMap()
    return [
        deidentify_dataset(ds, uid_map, patient_name=pseudonym or DEIDENTIFIED_PATIENT_NAME, patient_id=pseudonym or "")
        for ds in sources
    ]
