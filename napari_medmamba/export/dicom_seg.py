"""DICOM-SEG export with highdicom: a SEGMENTATION instance referencing the source series.

The label map must lie on the grid of a DICOM series read with ``read_volume`` (so
``Volume.dicom`` lists the source files in array z order). Each label value present
becomes one segment (numbered 1..n in ascending label value) named after the label;
the SEG copies the patient and study of the source, shares its frame of reference and
references every source instance, so PACS and viewers place it on the series.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..atomic_write import atomic_write
from ..annotation.edit_log import EditLog
from ..io.volume import DicomInfo, Volume
from .errors import DicomSourceError, ExportError
from .label_table import LabelColors, LabelNames, check_label_map, label_colors_dict, label_names_dict, present_labels

__all__ = ["export_dicom_seg", "derived_source_uids", "DicomSegWarning", "ALGORITHM_TYPES"]

ALGORITHM_TYPES = ("AUTOMATIC", "SEMIAUTOMATIC", "MANUAL")


class DicomSegWarning(UserWarning):
    """The source series lacks an identifier the SEG needs; a derived one is used."""


def _highdicom() -> Any:
    try:
        import highdicom
    except ImportError:
        raise ImportError(
            "DICOM-SEG export needs highdicom: pip install 'napari-medmamba[dicom]' (or pip install highdicom)"
        ) from None
    return highdicom


def derived_source_uids(info: DicomInfo) -> dict[str, str]:
    """Study, series and frame-of-reference UIDs of the source, derived where missing.

    Anonymised series sometimes have empty UIDs; a SEG must reference real ones, so a
    UID is derived deterministically from the SOP instance UIDs (the same series always
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


def _source_datasets(source: Volume, path: Path) -> list[Any]:
    """The source instances in z order, with UIDs filled from the file meta or derived."""
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
            f"the source series has no {', '.join(missing)}; the DICOM-SEG uses derived UIDs "
            f"({', '.join(uids[k] for k in missing)}) that other software will not recognise",
            DicomSegWarning,
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


_SITE_KEYWORDS = ("InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName",
                  "DeviceSerialNumber", "OperatorsName")


def _drop_site_identifiers(seg: Any) -> None:
    """Remove the hospital's name/address and scanner serial highdicom copies from the source.

    highdicom lists the source's acquisition equipment in ContributingEquipmentSequence,
    including InstitutionName/Address, StationName and the scanner's DeviceSerialNumber;
    only the patient and study modules are meant to be copied, so those are dropped
    (manufacturer, model and software versions stay as provenance).
    """
    for item in seg.get("ContributingEquipmentSequence", []):
        for keyword in _SITE_KEYWORDS:
            if keyword in item:
                delattr(item, keyword)


def _segment_codes(value: int, codes_for: Mapping[int, tuple[Any, Any]] | None, codes: Any) -> tuple[Any, Any]:
    if codes_for and value in codes_for:
        return codes_for[value]
    return codes.SCT.AnatomicalStructure, codes.SCT.AnatomicalStructure


def export_dicom_seg(
    labels: np.ndarray,
    source: Volume,
    label_names: LabelNames,
    label_colors: LabelColors,
    path: str | PathLike[str],
    *,
    model_name: str = "napari-medmamba",
    model_version: str = __version__,
    algorithm_type: str | None = None,
    edit_log: EditLog | None = None,
    segment_codes: Mapping[int, tuple[Any, Any]] | None = None,
    series_description: str = "napari-medmamba segmentation",
    series_number: int = 300,
    content_creator_name: str | None = None,
    manufacturer: str = "napari-medmamba",
    deidentify: bool = False,
    pseudonym: str | None = None,
) -> Path:
    """Write ``labels`` (on ``source``'s grid) as a DICOM-SEG file at ``path``; returns the path.

    ``algorithm_type`` is AUTOMATIC, SEMIAUTOMATIC or MANUAL; by default SEMIAUTOMATIC
    when ``edit_log`` shows user edits, else AUTOMATIC. The algorithm is identified by
    ``model_name`` / ``model_version`` (family: Artificial Intelligence).
    ``segment_codes`` maps label values to (category, type) codes (pydicom ``Code``);
    by default both are SCT "Anatomical Structure". Raises :class:`DicomSourceError`
    when ``source`` is not a DICOM series, :class:`ExportError` for other problems.

    By default the SEG carries the source's patient and study identifiers (so a PACS files
    it with the scan). ``deidentify=True`` instead applies
    :func:`napari_medmamba.privacy.deidentify_dataset` to the source headers first: patient
    name ``pseudonym`` (default "ANONYMOUS"), patient ID ``pseudonym`` (default empty),
    no birth date, study identifiers emptied, and new study/series/frame-of-reference/
    instance UIDs (randomly salted, so they do not match the original series).
    """
    path = Path(path)
    if source.dicom is None:
        where = f"{source.path}" if source.path is not None else "the source volume"
        raise DicomSourceError(
            path,
            f"DICOM-SEG needs a DICOM source series, but {where} was not read from DICOM; "
            "export NIfTI/NRRD instead",
        )
    hd = _highdicom()
    from pydicom.sr.codedict import codes

    try:
        labels = check_label_map(labels, source.shape)
        colors = label_colors_dict(label_colors)
    except ValueError as exc:
        raise ExportError(path, str(exc)) from None
    values = present_labels(labels)
    if not values:
        raise ExportError(path, "the label map is empty: there is no segment to export")
    if algorithm_type is None:
        edited = edit_log is not None and any(e.kind not in ("model_run",) for e in edit_log.edits)
        algorithm_type = "SEMIAUTOMATIC" if edited else "AUTOMATIC"
    algorithm_type = algorithm_type.upper()
    if algorithm_type not in ALGORITHM_TYPES:
        raise ExportError(path, f"algorithm_type must be one of {', '.join(ALGORITHM_TYPES)}, got {algorithm_type!r}")
    sources = _source_datasets(source, path)
    if deidentify:
        from ..privacy import DEIDENTIFIED_PATIENT_NAME, UidMap, deidentify_dataset

        uid_map = UidMap()
        sources = [
            deidentify_dataset(ds, uid_map, patient_name=pseudonym or DEIDENTIFIED_PATIENT_NAME,
                               patient_id=pseudonym or "")
            for ds in sources
        ]

    names = label_names_dict(label_names)
    algorithm = None
    if algorithm_type != "MANUAL":
        algorithm = hd.AlgorithmIdentificationSequence(
            name=model_name, family=codes.cid7162.ArtificialIntelligence, version=str(model_version)
        )
    descriptions = []
    for number, value in enumerate(values, start=1):
        category, kind = _segment_codes(value, segment_codes, codes)
        color = colors.get(value)
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=names.get(value, f"label {value}")[:64],
                segmented_property_category=category,
                segmented_property_type=kind,
                algorithm_type=algorithm_type,
                algorithm_identification=algorithm,
                tracking_id=f"label value {value}",
                tracking_uid=hd.UID(),
                display_color=hd.color.CIELabColor.from_rgb(*color) if color is not None else None,
            )
        )
    lookup = np.zeros(max(values) + 1, dtype=np.uint16 if len(values) > 255 else np.uint8)
    lookup[values] = np.arange(1, len(values) + 1)
    segment_map = lookup[labels]
    try:
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=segment_map,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=int(series_number),
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer=manufacturer,
            manufacturer_model_name=model_name,
            software_versions=f"napari-medmamba {__version__}",
            device_serial_number="0",
            series_description=series_description[:64],
            content_creator_name=content_creator_name,
            content_label="SEGMENTATION",
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise ExportError(path, f"highdicom refused the segmentation: {exc}") from None
    _drop_site_identifiers(seg)
    try:
        return atomic_write(path, lambda fh: seg.save_as(fh, enforce_file_format=True))
    except OSError as exc:
        raise ExportError(path, str(exc.strerror or exc)) from None
