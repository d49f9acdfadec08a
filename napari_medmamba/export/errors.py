"""Exceptions of the exporters; each names the file and what is wrong."""

from __future__ import annotations

from ..io.errors import VolumeWriteError

__all__ = ["ExportError", "DicomSourceError"]


class ExportError(VolumeWriteError):
    """An export could not be written (a :class:`VolumeWriteError`, so callers catching that see it)."""

    action = "export"


class DicomSourceError(ExportError):
    """A DICOM export needs a DICOM source series, and the given source is not one (or changed)."""
