"""DICOM-SEG export with highdicom: a SEGMENTATION instance referencing the source series.

The label map must lie on the grid of a DICOM series read with ``read_volume`` (so
``Volume.dicom`` lists the source files in array z order). Each label value present
becomes one segment (numbered 1..n in ascending label value) named after the label;
the SEG copies the patient and study of the source, shares its frame of reference and
references every source instance, so PACS and viewers place it on the series.
"""

from __future__ import annotations

from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..atomic_write import atomic_write
from ..annotation.edit_log import EditLog
from ..io.volume import Volume
from .dicom_source import (
    ALGORITHM_TYPES,
    DicomSourceWarning,
    algorithm_type_for,
    deidentified_sources,
    derived_source_uids,
    prepared_labels,
    require_dicom_source,
    source_datasets,
)
from .errors import ExportError
from .label_table import LabelColors, LabelNames, label_names_dict

__all__ = ["export_dicom_seg", "derived_source_uids", "DicomSegWarning", "ALGORITHM_TYPES"]


class DicomSegWarning(DicomSourceWarning):
    """The source series lacks an identifier the SEG needs; a derived one is used."""


def _highdicom() -> Any:
    try:
        import highdicom
    except ImportError:
        raise ImportError(
            "DICOM-SEG export needs highdicom: pip install 'napari-medmamba[dicom]' (or pip install highdicom)"
        ) from None
    return highdicom


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
    require_dicom_source(source, path, "DICOM-SEG")
    hd = _highdicom()
    from pydicom.sr.codedict import codes

    labels, colors, values = prepared_labels(labels, source, label_colors, path, "segment")
    algorithm_type = algorithm_type_for(algorithm_type, edit_log, path)
    sources = source_datasets(source, path, what="DICOM-SEG", category=DicomSegWarning)
    if deidentify:
        sources = deidentified_sources(sources, pseudonym)

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
