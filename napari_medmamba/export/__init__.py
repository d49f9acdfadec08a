"""Exporters (Qt-free): label volumes CSV, surface meshes, summary JSON, DICOM-SEG, RTSTRUCT.

Label maps themselves are written with :func:`napari_medmamba.io.write_labels`
(NIfTI, NRRD, MetaImage); see ``docs/exports.md`` for what each export contains.
"""

from ..io.write import write_labels
from .dicom_seg import DicomSegWarning, derived_source_uids, export_dicom_seg
from .errors import DicomSourceError, ExportError
from .label_table import LabelStats, label_stats
from .meshes import export_meshes, label_mesh
from .rtstruct import RtStructWarning, export_rtstruct, rtstruct_roi_names, rtstruct_to_labels
from .summary_json import export_summary_json, sha256_of_file
from .volumes_csv import VOLUMES_CSV_COLUMNS, export_volumes_csv

__all__ = [
    "VOLUMES_CSV_COLUMNS",
    "DicomSegWarning",
    "DicomSourceError",
    "ExportError",
    "LabelStats",
    "RtStructWarning",
    "derived_source_uids",
    "export_dicom_seg",
    "export_meshes",
    "export_rtstruct",
    "export_summary_json",
    "export_volumes_csv",
    "label_mesh",
    "label_stats",
    "rtstruct_roi_names",
    "rtstruct_to_labels",
    "sha256_of_file",
    "write_labels",
]
