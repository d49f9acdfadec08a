"""The two exceptions of scan input/output; each names the file and what is wrong."""

from __future__ import annotations

from os import PathLike
from pathlib import Path

__all__ = ["VolumeIOError", "VolumeReadError", "VolumeWriteError", "itk_message"]


class VolumeIOError(OSError, ValueError):
    """A scan could not be read or written.

    Subclasses both ``OSError`` and ``ValueError`` (like ``io.UnsupportedOperation``), so
    code that catches either keeps working. ``path`` is the file or folder concerned and
    ``problem`` a sentence saying what is wrong with it.
    """

    action = "use"

    def __init__(self, path: str | PathLike[str], problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"cannot {self.action} {str(self.path)!r}: {problem}")

    def __reduce__(self) -> tuple[type, tuple[Path, str]]:
        return (type(self), (self.path, self.problem))


class VolumeReadError(VolumeIOError):
    """A scan file or DICOM folder could not be read as a 3D volume."""

    action = "read"


class VolumeWriteError(VolumeIOError):
    """A volume or label map could not be written."""

    action = "write"


def itk_message(error: Exception) -> str:
    """The informative line of a SimpleITK/ITK exception message (they span many lines)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "Description" in line:
            return line.split(":", 1)[-1].strip()
        if "ITK ERROR" in line:
            return line
    return lines[-1] if lines else type(error).__name__
