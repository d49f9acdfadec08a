"""Bring a scan onto a model's working grid and back: orientation, resampling, normalisation.

Orientation is a pure permutation/flip of the voxel axes (the one SimpleITK's
``DICOMOrient`` performs), done in NumPy so that it can be undone exactly, also on
multi-channel probability arrays. Resampling uses ``sitk.Resample`` (linear) on grids that
share origin and direction, so the way back lands on the source voxels exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import SimpleITK as sitk

from ..io.volume import Geometry
from ..models.registry import InputContract
from .errors import SegmentationCancelled

__all__ = [
    "Orientation",
    "orientation_code",
    "plan_orientation",
    "working_shape",
    "resample_linear",
    "normalize",
]

_POSITIVE = "LPS"  # SimpleITK's letters for +x, +y, +z (identity direction = "LPS")
_NEGATIVE = "RAI"


def orientation_code(geometry: Geometry) -> str:
    """The 3-letter orientation code SimpleITK gives this geometry's direction (e.g. "LPS")."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(geometry.direction)


@dataclass(frozen=True)
class Orientation:
    """A permutation/flip of the (x, y, z) index axes and the grid it produces.

    New index axis ``i`` is source index axis ``perm[i]``, reversed when ``flip[i]``.
    """

    perm: tuple[int, int, int]
    flip: tuple[bool, bool, bool]
    source_shape: tuple[int, int, int]
    """Source array shape (z, y, x)."""
    geometry: Geometry
    """Geometry of the reoriented grid."""

    @property
    def is_identity(self) -> bool:
        return self.perm == (0, 1, 2) and not any(self.flip)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Reoriented array shape (z, y, x)."""
        return tuple(self.source_shape[2 - self.perm[2 - a]] for a in range(3))  # type: ignore[return-value]

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Reorient the last three (z, y, x) axes of ``array`` (a view when possible)."""
        lead = array.ndim - 3
        axes = list(range(lead)) + [lead + 2 - self.perm[2 - a] for a in range(3)]
        out = np.transpose(array, axes)
        flips = tuple(lead + a for a in range(3) if self.flip[2 - a])
        return np.flip(out, flips) if flips else out

    def undo(self, array: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`apply`: back to the source axis order and direction."""
        lead = array.ndim - 3
        flips = tuple(lead + a for a in range(3) if self.flip[2 - a])
        out = np.flip(array, flips) if flips else array
        forward = [2 - self.perm[2 - a] for a in range(3)]  # new numpy axis a <- source numpy axis forward[a]
        inverse = [forward.index(s) for s in range(3)]
        return np.transpose(out, list(range(lead)) + [lead + a for a in inverse])


def plan_orientation(geometry: Geometry, shape_zyx: tuple[int, int, int], target: str | None) -> Orientation:
    """The axis permutation/flip that takes ``geometry`` to orientation code ``target``.

    Matches ``sitk.DICOMOrient(image, target)`` (same voxels, same geometry). ``None`` keeps
    the scan as it is.
    """
    shape_zyx = tuple(int(s) for s in shape_zyx)  # type: ignore[assignment]
    if target is None:
        return Orientation((0, 1, 2), (False, False, False), shape_zyx, geometry)  # type: ignore[arg-type]
    target = target.upper()
    current = orientation_code(geometry)
    perm: list[int] = []
    flip: list[bool] = []
    for letter in target:
        for j, have in enumerate(current):
            pair = {_POSITIVE["LRPAIS".index(have) // 2], _NEGATIVE["LRPAIS".index(have) // 2]}
            if letter in pair:
                perm.append(j)
                flip.append(letter != have)
                break
        else:
            raise ValueError(f"invalid orientation code {target!r}")
    if sorted(perm) != [0, 1, 2]:
        raise ValueError(f"invalid orientation code {target!r}")
    d = geometry.direction_matrix
    size_xyz = shape_zyx[::-1]
    start = np.zeros(3)
    for i in range(3):
        if flip[i]:
            start[perm[i]] = size_xyz[perm[i]] - 1
    origin = np.asarray(geometry.origin) + d @ (np.asarray(geometry.spacing) * start)
    new_d = np.stack([(-1.0 if flip[i] else 1.0) * d[:, perm[i]] for i in range(3)], axis=1)
    new_geometry = Geometry(
        tuple(geometry.spacing[p] for p in perm), tuple(origin), tuple(new_d.reshape(-1))  # type: ignore[arg-type]
    )
    return Orientation(tuple(perm), tuple(flip), shape_zyx, new_geometry)  # type: ignore[arg-type]


def working_shape(shape_zyx: tuple[int, int, int], spacing_zyx: tuple[float, ...], target_zyx: tuple[float, ...]) -> tuple[int, int, int]:
    """Shape of the grid with spacing ``target_zyx`` covering the same extent (at least 1 voxel)."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape_zyx, spacing_zyx, target_zyx))  # type: ignore[return-value]


def _sitk_image(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    return geometry.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(array)))


def resample_linear(
    array: np.ndarray,
    source: Geometry,
    target: Geometry,
    target_shape: tuple[int, int, int],
    out: np.ndarray | None = None,
    cancel: Callable[[], bool] | None = None,
    slab: int = 64,
) -> np.ndarray:
    """Linear resampling of a (z, y, x) array from ``source`` onto the ``target`` grid.

    Voxels beyond the source grid take their nearest source value. Work is done in z slabs
    of ``slab`` slices (bounded memory; ``cancel`` is checked between slabs and aborts
    SimpleITK mid-slab). Writes into ``out`` (any float dtype) when given.
    """
    image = _sitk_image(array.astype(np.float32, copy=False), source)
    if out is None:
        out = np.empty(target_shape, dtype=np.float32)
    m = target.direction_matrix @ np.diag(target.spacing)
    nz, ny, nx = target_shape
    for z0 in range(0, nz, slab):
        if cancel is not None and cancel():
            raise SegmentationCancelled("segmentation cancelled during resampling")
        z1 = min(nz, z0 + slab)
        f = sitk.ResampleImageFilter()
        f.SetSize((nx, ny, z1 - z0))
        f.SetOutputSpacing(target.spacing)
        f.SetOutputDirection(target.direction)
        f.SetOutputOrigin(tuple(np.asarray(target.origin) + m @ np.array([0.0, 0.0, z0])))
        f.SetInterpolator(sitk.sitkLinear)
        f.SetOutputPixelType(sitk.sitkFloat32)
        f.SetUseNearestNeighborExtrapolator(True)
        if cancel is not None:
            f.AddCommand(sitk.sitkProgressEvent, lambda f=f: f.Abort() if cancel() else None)
        try:
            result = f.Execute(image)
        except RuntimeError as error:
            if cancel is not None and cancel():
                raise SegmentationCancelled("segmentation cancelled during resampling") from error
            raise
        out[z0:z1] = sitk.GetArrayViewFromImage(result)
    return out


def normalize(array: np.ndarray, contract: InputContract) -> np.ndarray:
    """Intensity normalisation the model was trained with, as float32.

    'ct': clip to ``contract.ct_window`` then ``(x - mean) / std`` with ``contract.ct_stats``.
    'zscore': subtract the volume's mean and divide by its standard deviation (all voxels).
    """
    x = array.astype(np.float32, copy=True)
    if contract.normalization == "ct":
        if contract.ct_window is None or contract.ct_stats is None:
            raise ValueError("normalization 'ct' needs ct_window and ct_stats in the contract")
        np.clip(x, contract.ct_window[0], contract.ct_window[1], out=x)
        mean, std = contract.ct_stats
    elif contract.normalization == "zscore":
        mean, std = float(x.mean(dtype=np.float64)), float(x.std(dtype=np.float64))
    else:
        raise ValueError(f"unknown normalization {contract.normalization!r}")
    x -= np.float32(mean)
    x /= np.float32(max(std, 1e-8))
    return x
