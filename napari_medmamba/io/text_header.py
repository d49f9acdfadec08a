"""Checks on NRRD and MetaImage text headers made before ITK sees them.

ITK's MetaImage reader corrupts its heap or crashes on an out-of-range ``NDims``; its
readers multiply sizes in 64-bit integers that a hostile header can overflow (so that a
huge image looks small); and a data file that is a pipe or a device (``/dev/urandom``)
makes them block or read forever. These headers are parsed here first, in Python, and
refused with a :class:`VolumeReadError` naming the file and the field.
"""

from __future__ import annotations

import math
import stat
from pathlib import Path

from .errors import VolumeReadError
from .limits import MAX_VOXELS_ENV

__all__ = ["check_text_header", "MAX_DIMENSIONS"]

MAX_DIMENSIONS = 5
"""Most axes accepted in a header (SimpleITK handles up to 5; a 3D scan needs 3)."""
_MAX_HEADER_BYTES = 1 << 20
_MAX_DATA_FILES = 4096


def _header_lines(path: Path, ext: str) -> list[str] | None:
    """The header lines (latin-1), or None when the file cannot be read (ITK will say why)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(_MAX_HEADER_BYTES)
    except OSError:
        return None
    text = raw.decode("latin-1")
    if ext in (".nrrd", ".nhdr"):
        end = text.find("\n\n")
        if end < 0:
            end = text.find("\r\n\r\n")
        return (text if end < 0 else text[:end]).splitlines()
    lines = []
    for line in text.splitlines():
        lines.append(line)
        if line.split("=", 1)[0].strip() == "ElementDataFile":
            break
    return lines


def _all_lines(path: Path) -> list[str]:
    """Every line of the file's first MiB (latin-1); [] when it cannot be read."""
    try:
        with open(path, "rb") as fh:
            return fh.read(_MAX_HEADER_BYTES).decode("latin-1").splitlines()
    except OSError:
        return []


def _ints(path: Path, field: str, value: str) -> list[int]:
    try:
        return [int(v) for v in value.split()]
    except ValueError:
        raise VolumeReadError(path, f"header field {field} = {value[:80]!r} is not a list of whole numbers") from None


def _check_sizes(path: Path, field: str, sizes: list[int], ndims: int | None, limit: int) -> None:
    if ndims is not None and len(sizes) != ndims:
        raise VolumeReadError(path, f"header field {field} lists {len(sizes)} sizes for {ndims} dimensions")
    if any(s < 0 for s in sizes):
        raise VolumeReadError(path, f"header field {field} has a negative size {tuple(sizes)}")
    voxels = math.prod(sizes)  # exact: no 64-bit overflow
    if voxels > limit:
        raise VolumeReadError(
            path,
            f"{voxels:,} voxels ({field} {tuple(sizes)}) exceed the limit of {limit:,}; "
            f"raise it with max_voxels= or the {MAX_VOXELS_ENV} environment variable",
        )


def _check_ndims(path: Path, field: str, value: str) -> int:
    try:
        ndims = int(value)
    except ValueError:
        raise VolumeReadError(path, f"header field {field} = {value[:80]!r} is not a whole number") from None
    if not 1 <= ndims <= MAX_DIMENSIONS:
        raise VolumeReadError(path, f"header field {field} = {ndims} is out of range (1 to {MAX_DIMENSIONS})")
    return ndims


def _data_files(value: str, following: list[str]) -> list[str]:
    """File names a data-file field refers to (LIST, a printf pattern, or one name); [] for LOCAL."""
    value = value.strip()
    if not value or value.upper() == "LOCAL":
        return []
    if value.upper().startswith("LIST"):
        listed = [line.strip() for line in following if line.strip()][:_MAX_DATA_FILES + 1]
        return listed if len(listed) != 1 else listed * 2  # a list is checked as a list, even of one

    parts = value.split()
    if "%" in parts[0] and len(parts) >= 4:
        try:
            first, last, step = int(parts[1]), int(parts[2]), int(parts[3])
            numbers = range(first, last + (1 if step > 0 else -1), step) if step else range(0)
            if len(numbers) > _MAX_DATA_FILES:
                return [f"{_MAX_DATA_FILES + 1} files"] * (_MAX_DATA_FILES + 1)
            return [parts[0] % n for n in numbers]
        except (ValueError, TypeError, OverflowError):
            return []  # ITK will refuse the pattern itself
    return [value]


def _check_data_files(path: Path, names: list[str]) -> None:
    """Data files must be regular files; of a list (LIST or a pattern) each must exist too.

    ITK's NRRD reader crashes (segmentation fault) on a LIST naming files that do not exist;
    a single missing data file is reported by ITK itself when the pixel data is read.
    """
    if len(names) > _MAX_DATA_FILES:
        raise VolumeReadError(path, f"the header lists more than {_MAX_DATA_FILES} data files")
    several = len(names) > 1
    for name in names:
        if several and (not name.isprintable() or len(name) > 4096):
            raise VolumeReadError(path, f"its list of data files holds an invalid name {name[:40]!r}")
        target = Path(name) if Path(name).is_absolute() else path.parent / name
        try:
            mode = target.stat().st_mode
        except (OSError, ValueError):
            if several:
                raise VolumeReadError(path, f"its data file {name[:80]!r} (one of {len(names)}) does not exist") from None
            continue  # missing: ITK reports it when the pixel data is read
        if not stat.S_ISREG(mode):
            raise VolumeReadError(path, f"its data file {name!r} is not a regular file (a pipe, device or folder)")


def check_text_header(path: Path, ext: str, limit: int) -> None:
    """Refuse a NRRD/MetaImage header ITK could crash, overflow or hang on (see the module docstring)."""
    lines = _header_lines(path, ext)
    if lines is None:
        return
    if ext in (".nrrd", ".nhdr"):
        fields: dict[str, str] = {}
        data_index = None
        for i, line in enumerate(lines[1:], start=1):
            if line.startswith("#") or ":=" in line or ": " not in line:
                continue
            key, value = line.split(": ", 1)
            fields.setdefault(key.strip().lower(), value.strip())
            if key.strip().lower() in ("data file", "datafile") and data_index is None:
                data_index = i
        ndims = _check_ndims(path, "dimension", fields["dimension"]) if "dimension" in fields else None
        if "sizes" in fields:
            _check_sizes(path, "sizes", _ints(path, "sizes", fields["sizes"]), ndims, limit)
        if data_index is not None:
            value = lines[data_index].split(": ", 1)[1]
            following = lines[data_index + 1:]
            if value.strip().upper().startswith("LIST"):  # the names run to the end of the file
                following = _all_lines(path)[data_index + 1:]
            _check_data_files(path, _data_files(value, following))
        return
    meta: dict[str, str] = {}
    for line in lines:
        if "=" in line:
            key, value = line.split("=", 1)
            meta.setdefault(key.strip(), value.strip())
    ndims = _check_ndims(path, "NDims", meta["NDims"]) if "NDims" in meta else None
    if "DimSize" in meta:
        _check_sizes(path, "DimSize", _ints(path, "DimSize", meta["DimSize"]), ndims, limit)
    if "ElementNumberOfChannels" in meta:
        channels = _ints(path, "ElementNumberOfChannels", meta["ElementNumberOfChannels"])
        if len(channels) != 1 or not 1 <= channels[0] <= 64:
            raise VolumeReadError(path, f"header field ElementNumberOfChannels = {meta['ElementNumberOfChannels']!r} "
                                        "is out of range (1 to 64)")
    if "ElementDataFile" in meta:
        rest = _all_lines(path)[len(lines):] if meta["ElementDataFile"].upper().startswith("LIST") else []
        _check_data_files(path, _data_files(meta["ElementDataFile"], rest))
