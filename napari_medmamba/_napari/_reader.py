"""npe2 reader: NIfTI, NRRD, MetaImage and DICOM (files or series folders) -> Image or Labels layer."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..io import Volume, VolumeReadError, read_volume
from ..io.formats import is_dicom_file, volume_extension
from ._layers import image_layer_data, labels_layer_data

__all__ = ["get_reader", "accepts_path", "read_layers", "looks_like_labels"]

_MAX_FILES_CHECKED = 64

LayerData = tuple[Any, dict[str, Any], str]
PathOrPaths = str | Sequence[str]


def _folder_has_dicom(folder: Path) -> bool:
    """True when one of the folder's first files is DICOM (extension or 'DICM' magic)."""
    try:
        with os.scandir(folder) as entries:
            for count, entry in enumerate(entries):
                if count >= _MAX_FILES_CHECKED:
                    break
                if entry.is_file() and is_dicom_file(entry.path):
                    return True
    except OSError:
        return False
    return False


def accepts_path(path: str | os.PathLike[str]) -> bool:
    """Whether this plugin reads ``path``: a scan file, a DICOM file or a folder of DICOM files."""
    try:
        if not os.fspath(path):
            return False
        p = Path(path)
        if p.is_dir():
            return _folder_has_dicom(p)
        return p.is_file() and (volume_extension(p) is not None or is_dicom_file(p))
    except (TypeError, ValueError, OSError):
        return False


def get_reader(path: PathOrPaths) -> Callable[[PathOrPaths], list[LayerData]] | None:
    """npe2 ``get_reader`` hook: a reader function for ``path``, or None when not ours."""
    try:
        paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    except TypeError:
        return None
    if not paths or not all(accepts_path(p) for p in paths):
        return None
    return read_layers


_LABEL_NAME = re.compile(r"(label|seg|mask)", re.IGNORECASE)


def looks_like_labels(volume: Volume) -> bool:
    """A label map: unsigned integers, and 'label', 'seg' or 'mask' in the file name."""
    return (volume.array.dtype.kind == "u" and volume.path is not None
            and bool(_LABEL_NAME.search(Path(volume.path).name)))


def read_layers(path: PathOrPaths, **_: Any) -> list[LayerData]:
    """Read each path as one layer (Labels for label maps, Image otherwise); broken files notify, never raise."""
    from napari.utils.notifications import show_error

    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    layers: list[LayerData] = []
    for p in paths:
        try:
            volume = read_volume(p)
            if looks_like_labels(volume):
                layers.append(labels_layer_data(volume.array, like=volume, name=volume.name))
            else:
                layers.append(image_layer_data(volume))
        except VolumeReadError as error:
            show_error(f"MedMamba could not read {p}: {error}")
    # [(None,)] tells napari/npe2 "handled, nothing to add" without a second error.
    return layers or [(None,)]  # type: ignore[list-item]
