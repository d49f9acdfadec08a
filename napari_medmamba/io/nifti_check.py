"""Checks on the raw NIfTI header that ITK's NIfTI reader does not make.

ITK silently fills a truncated .nii/.nii.gz with whatever is in memory, and turns axes
of size 0 into size 1, so both are detected here from the header itself before pixel data
is read.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .errors import VolumeReadError

__all__ = ["check_nifti_complete", "check_nifti_geometry_finite", "nifti_layout"]

_CHUNK = 1 << 22


def _open(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")  # type: ignore[return-value]


def nifti_layout(path: Path) -> tuple[tuple[int, ...], int, int] | None:
    """(dims, bits per voxel, byte offset of the voxels) from a NIfTI-1/2 header, or None."""
    try:
        with _open(path) as fh:
            raw = fh.read(540)
    except (OSError, EOFError, zlib.error):
        return None
    if len(raw) < 348:
        return None
    for endian in "<>":
        size = struct.unpack(endian + "i", raw[:4])[0]
        if size == 348:
            dim = struct.unpack(endian + "8h", raw[40:56])
            bitpix = struct.unpack(endian + "h", raw[72:74])[0]
            offset_f = struct.unpack(endian + "f", raw[108:112])[0]
            if not math.isfinite(offset_f):  # NaN/inf vox_offset: int() would raise
                raise VolumeReadError(path, f"the NIfTI header's vox_offset is {offset_f}, not a byte offset")
            offset = int(offset_f)
            break
        if size == 540 and len(raw) == 540:
            bitpix = struct.unpack(endian + "h", raw[14:16])[0]
            dim = struct.unpack(endian + "8q", raw[16:80])
            offset = struct.unpack(endian + "q", raw[168:176])[0]
            break
    else:
        return None
    ndim = dim[0]
    if not 1 <= ndim <= 7:
        return None
    return tuple(int(d) for d in dim[1 : ndim + 1]), int(bitpix), int(offset)


def _gzip_size(path: Path) -> int:
    """Uncompressed size of a gzip file, decompressing it in chunks (constant memory)."""
    total = 0
    try:
        with gzip.open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                total += len(chunk)
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise VolumeReadError(path, f"the compressed data is truncated or corrupt ({error})") from None
    return total


def check_nifti_complete(path: Path) -> None:
    """Raise :class:`VolumeReadError` for an axis of size 0 or fewer bytes than the header needs."""
    layout = nifti_layout(path)
    if layout is None:
        return  # not a header this module understands; ITK has already accepted it
    dims, bitpix, offset = layout
    if any(d <= 0 for d in dims):
        raise VolumeReadError(path, f"has an axis of size 0 (NIfTI dim {dims})")
    expected = offset + int(np.prod(dims, dtype=np.int64)) * bitpix // 8
    if path.name.lower().endswith(".gz"):
        with open(path, "rb") as fh:
            fh.seek(-4, 2)
            trailer = int.from_bytes(fh.read(4), "little")  # gzip ISIZE: uncompressed size mod 2**32
        if trailer == expected % 2**32:
            return
        actual = _gzip_size(path)  # the quick check failed (or multi-member gzip): read it all
    else:
        actual = path.stat().st_size
    if actual < expected:
        problem = f"the file is truncated: the header needs {expected:,} bytes but it holds {actual:,}"
        raise VolumeReadError(path, problem)


# (offset, struct format) of the float fields that place the grid: pixdim[1..3], quatern_b..qoffset_z, srow_x..z
_GEOMETRY_FIELDS = {348: ((80, "3f"), (256, "6f"), (280, "12f")), 540: ((112, "3d"), (352, "6d"), (400, "12d"))}


def check_nifti_geometry_finite(path: Path) -> None:
    """Raise :class:`VolumeReadError` when the header's spacing, quaternion or sform holds NaN or infinity.

    ITK's NIfTI reader loops forever on some such headers (an infinite srow value),
    so this runs before ITK reads the header.
    """
    try:
        with _open(path) as fh:
            raw = fh.read(540)
    except (OSError, EOFError, zlib.error):
        return
    for endian in "<>":
        if len(raw) >= 4 and struct.unpack(endian + "i", raw[:4])[0] in _GEOMETRY_FIELDS:
            size = struct.unpack(endian + "i", raw[:4])[0]
            break
    else:
        return
    if len(raw) < size:
        return
    for offset, fmt in _GEOMETRY_FIELDS[size]:
        values = struct.unpack_from(endian + fmt, raw, offset)
        if not all(math.isfinite(v) for v in values):
            raise VolumeReadError(path, "the NIfTI header's voxel spacing or orientation holds NaN or infinity")
