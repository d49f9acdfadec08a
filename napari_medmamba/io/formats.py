"""File formats read and written through SimpleITK, chosen by file extension."""

from __future__ import annotations

from os import PathLike
from pathlib import Path

__all__ = ["VOLUME_EXTENSIONS", "DICOM_EXTENSIONS", "volume_extension", "is_dicom_file"]

VOLUME_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
"""Single-file (or header + data file) volume formats, longest suffix first."""

DICOM_EXTENSIONS: tuple[str, ...] = (".dcm", ".dicom", ".ima")
"""Extensions taken as DICOM without looking inside (files without one are checked)."""


def volume_extension(path: str | PathLike[str]) -> str | None:
    """The volume format extension ``path`` ends with (lower case), or None."""
    name = Path(path).name.lower()
    for ext in VOLUME_EXTENSIONS:
        if name.endswith(ext):
            return ext
    return None


def is_dicom_file(path: str | PathLike[str]) -> bool:
    """True when ``path`` is a file with a DICOM extension or the DICM preamble marker."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix.lower() in DICOM_EXTENSIONS:
        return True
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False
