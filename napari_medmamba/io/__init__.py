"""Scan input/output with exact geometry (Qt-free).

``read_volume`` reads NIfTI, NRRD, MetaImage and DICOM series into a :class:`Volume`;
``write_labels`` / ``write_volume`` write back on the same grid. Failures raise
:class:`VolumeReadError` / :class:`VolumeWriteError`, which name the file and the problem.
"""

from .errors import VolumeIOError, VolumeReadError, VolumeWriteError
from .formats import VOLUME_EXTENSIONS
from .limits import DEFAULT_MAX_VOXELS, MAX_VOXELS_ENV
from .read import read_volume
from .volume import DicomInfo, Geometry, Volume
from .write import write_labels, write_volume

__all__ = [
    "DEFAULT_MAX_VOXELS",
    "DicomInfo",
    "Geometry",
    "MAX_VOXELS_ENV",
    "VOLUME_EXTENSIONS",
    "Volume",
    "VolumeIOError",
    "VolumeReadError",
    "VolumeWriteError",
    "read_volume",
    "write_labels",
    "write_volume",
]
