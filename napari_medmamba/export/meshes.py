"""Surface meshes of labels (marching cubes) in physical millimetres, as STL or OBJ."""

from __future__ import annotations

from os import PathLike
from pathlib import Path

import numpy as np

from ..io.volume import Geometry
from .errors import ExportError
from .label_table import LabelNames, check_label_map, label_names_dict, label_stats, safe_file_stem
from .mesh_files import signed_volume, write_obj, write_stl

__all__ = ["label_mesh", "export_meshes"]

_SIGNS = {"LPS": np.array([1.0, 1.0, 1.0]), "RAS": np.array([-1.0, -1.0, 1.0])}


def label_mesh(
    mask: np.ndarray, geometry: Geometry, offset: tuple[int, int, int] = (0, 0, 0), step_size: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Marching-cubes surface of a (z, y, x) boolean mask: LPS (x, y, z) mm vertices and faces.

    The mask is padded with background so the surface is closed; ``offset`` is the
    (z, y, x) index of ``mask[0, 0, 0]`` in the full grid. Vertices go through the full
    index-to-physical transform (spacing, direction, origin); faces are oriented so the
    normals point outwards.
    """
    from skimage.measure import marching_cubes

    padded = np.pad(mask.astype(np.float32), 1)
    verts, faces, _, _ = marching_cubes(padded, level=0.5, step_size=step_size, allow_degenerate=False)
    zyx = verts + (np.asarray(offset, dtype=float) - 1.0)
    xyz1 = np.c_[zyx[:, ::-1], np.ones(len(zyx))]
    physical = (xyz1 @ geometry.index_to_physical_matrix().T)[:, :3]
    faces = np.asarray(faces, dtype=np.int64)
    if signed_volume(physical, faces) < 0:
        faces = faces[:, ::-1].copy()
    return physical, faces


def export_meshes(
    labels: np.ndarray,
    geometry: Geometry,
    label_names: LabelNames,
    folder: str | PathLike[str],
    fmt: str = "stl",
    *,
    coordinate_system: str = "LPS",
    step_size: int = 1,
) -> list[Path]:
    """Write one mesh per label present in ``labels`` into ``folder``; returns the files.

    Files are named ``<value>_<name>.<fmt>``; coordinates are millimetres in LPS (the
    DICOM/ITK patient system) or, with ``coordinate_system="RAS"``, with x and y negated.
    The coordinate system is recorded in the STL header / OBJ comment as ``SPACE=LPS``.
    """
    folder = Path(folder)
    fmt = fmt.lower().lstrip(".")
    if fmt not in ("stl", "obj"):
        raise ExportError(folder, f"unknown mesh format {fmt!r}; use 'stl' or 'obj'")
    space = coordinate_system.upper()
    if space not in _SIGNS:
        raise ExportError(folder, f"unknown coordinate system {coordinate_system!r}; use 'LPS' or 'RAS'")
    try:
        labels = check_label_map(labels)
        stats = label_stats(labels, geometry, label_names, include_absent=False)
        folder.mkdir(parents=True, exist_ok=True)
    except ValueError as exc:
        raise ExportError(folder, str(exc)) from None
    except OSError as exc:
        raise ExportError(folder, f"cannot create the folder ({exc.strerror or exc})") from None
    names = label_names_dict(label_names)
    written: list[Path] = []
    for s in stats:
        box = s.bbox_index
        assert box is not None
        mask = labels[box] == s.value
        verts, faces = label_mesh(mask, geometry, tuple(b.start for b in box), step_size=step_size)
        verts = verts * _SIGNS[space]
        name = names.get(s.value, s.name)
        path = folder / f"{safe_file_stem(s.value, name)}.{fmt}"
        note = f"napari-medmamba label {s.value} {name} SPACE={space} units=mm"
        try:
            if fmt == "stl":
                write_stl(path, verts, faces, header=note)
            else:
                write_obj(path, verts, faces, name=safe_file_stem(s.value, name), comment=note)
        except OSError as exc:
            raise ExportError(path, str(exc.strerror or exc)) from None
        written.append(path)
    return written
