"""Write volumes and label maps on their source grid, atomically, with identical geometry."""

from __future__ import annotations

import os
import shutil
import tempfile
from os import PathLike
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import VolumeWriteError, itk_message
from .formats import VOLUME_EXTENSIONS, volume_extension
from .volume import Volume

__all__ = ["write_volume", "write_labels"]

_UNCOMPRESSED = (".nii",)  # formats without a compressed variant under the same name


def write_labels(labels: np.ndarray, like: Volume, path: str | PathLike[str]) -> Path:
    """Write a (z, y, x) integer label map on ``like``'s grid; returns the written path.

    The format follows the extension (.nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd), compressed
    where the format allows. The dtype is kept (bool becomes uint8). Float labels,
    negative labels and a shape other than ``like.shape`` raise :class:`VolumeWriteError`.
    """
    path = Path(path)
    labels = np.asarray(labels)
    if labels.dtype == np.bool_:
        labels = labels.astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        raise VolumeWriteError(
            path, f"labels must be integers, got dtype {labels.dtype}; round and cast them, e.g. .astype(np.uint16)"
        )
    if tuple(labels.shape) != like.shape:
        raise VolumeWriteError(path, f"label shape {labels.shape} differs from the scan grid {like.shape} (z, y, x)")
    if np.issubdtype(labels.dtype, np.signedinteger) and labels.size and int(labels.min()) < 0:
        raise VolumeWriteError(path, f"labels must not be negative (minimum {int(labels.min())})")
    return write_volume(like.with_array(labels), path)


def write_volume(volume: Volume, path: str | PathLike[str]) -> Path:
    """Write ``volume`` (array and geometry) to ``path``; returns the path written.

    Atomic: everything is written into a hidden temporary folder next to ``path`` and
    moved into place with ``os.replace`` (data file first, header last), so a crash never
    leaves a half-written file under the final name.
    """
    path = Path(path)
    ext = volume_extension(path)
    if ext is None:
        raise VolumeWriteError(path, f"unsupported extension; use one of {', '.join(VOLUME_EXTENSIONS)}")
    folder = path.parent
    if not folder.is_dir():
        raise VolumeWriteError(path, f"the folder {str(folder)!r} does not exist")
    if path.is_dir():
        raise VolumeWriteError(path, "a folder with that name exists")
    array = volume.array.astype(np.uint8) if volume.array.dtype == np.bool_ else volume.array
    try:
        image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    except (RuntimeError, TypeError) as error:
        raise VolumeWriteError(path, f"dtype {array.dtype} cannot be written ({itk_message(error)})") from None
    volume.geometry.apply_to(image)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder))
    except OSError as error:
        raise VolumeWriteError(path, f"the folder is not writable ({error.strerror or error})") from None
    try:
        sitk.WriteImage(image, str(staging / path.name), useCompression=ext not in _UNCOMPRESSED)
        written = sorted(staging.iterdir(), key=lambda f: f.name == path.name)  # header last
        for file in written:
            os.replace(file, folder / file.name)
    except RuntimeError as error:
        raise VolumeWriteError(path, itk_message(error)) from None
    except OSError as error:
        raise VolumeWriteError(path, str(error.strerror or error)) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path
