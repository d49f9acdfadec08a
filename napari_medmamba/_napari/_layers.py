"""Volume <-> napari layer conversion: exact geometry, metadata and display defaults.

Mapping: napari world coordinates are physical LPS millimetres in array axis order
(z, y, x). A layer gets ``scale`` = spacing (z, y, x), ``rotate`` = the direction matrix
with rows and columns reversed to (z, y, x) (a reflection when the scan is stored
flipped), and ``translate`` = origin (z, y, x). napari composes them as
``translate + rotate @ (scale * index)``, which equals ``Geometry.zyx_affine() @ index``.
The exact geometry also travels in ``layer.metadata["medmamba"]`` so labels are written
back on the source grid.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

from ..io import Geometry, Volume

if TYPE_CHECKING:
    import napari
    from napari.layers import Image, Labels

__all__ = [
    "METADATA_KEY",
    "geometry_kwargs",
    "volume_metadata",
    "contrast_limits",
    "image_layer_data",
    "labels_layer_data",
    "geometry_from_attributes",
    "volume_from_layer",
    "add_labels_like",
]

METADATA_KEY = "medmamba"
CT_WINDOW = (-160.0, 240.0)
"""Soft-tissue window (level 40 HU, width 400 HU)."""


def geometry_kwargs(geometry: Geometry) -> dict[str, Any]:
    """Layer keyword arguments that place an array in physical (z, y, x) millimetres."""
    affine = geometry.zyx_affine()
    spacing = np.asarray(geometry.spacing_zyx, dtype=float)
    kwargs: dict[str, Any] = {
        "scale": tuple(float(s) for s in spacing),
        "translate": tuple(float(t) for t in affine[:3, 3]),
        "rotate": affine[:3, :3] / spacing[None, :],
    }
    if _layers_have_units():
        kwargs["units"] = ("mm", "mm", "mm")
    return kwargs


@lru_cache(maxsize=1)
def _layers_have_units() -> bool:
    """napari >= 0.6 layers take ``units`` (the scale bar then reads mm)."""
    from napari.layers import Image

    return "units" in inspect.signature(Image.__init__).parameters


def volume_metadata(volume: Volume) -> dict[str, Any]:
    """The ``layer.metadata`` entry carrying a volume's exact geometry and provenance."""
    return {
        METADATA_KEY: {
            "geometry": volume.geometry.to_dict(),
            "shape": list(volume.shape),
            "source": None if volume.path is None else str(volume.path),
            "modality": volume.modality,
            "dicom": volume.dicom,
        }
    }


def contrast_limits(volume: Volume) -> tuple[float, float]:
    """A soft-tissue window for CT (HU), robust percentiles for anything else."""
    array = volume.array
    modality = (volume.modality or "").upper()
    step = max(1, int(np.ceil((array.size / 2_000_000) ** (1 / 3))))
    sample = np.asarray(array[::step, ::step, ::step], dtype=np.float64)
    if modality == "CT" or (not modality and sample.size and sample.min() <= -500):
        return CT_WINDOW
    foreground = sample[sample > sample.min()] if sample.size else sample
    values = foreground if foreground.size >= 100 else sample
    if values.size == 0:
        return (0.0, 1.0)
    low, high = (float(v) for v in np.percentile(values, [0.5, 99.5]))
    return (low, high) if high > low else (low, low + 1.0)


def image_layer_data(volume: Volume, name: str | None = None) -> tuple[np.ndarray, dict[str, Any], str]:
    """A napari ``LayerDataTuple`` for an Image layer of ``volume``."""
    kwargs = {
        "name": name or volume.name,
        "metadata": volume_metadata(volume),
        "contrast_limits": contrast_limits(volume),
        "colormap": "gray",
        **geometry_kwargs(volume.geometry),
    }
    return (volume.array, kwargs, "image")


def labels_layer_data(
    labels: np.ndarray, like: Volume, name: str = "labels"
) -> tuple[np.ndarray, dict[str, Any], str]:
    """A napari ``LayerDataTuple`` for a Labels layer on ``like``'s grid."""
    volume = like.with_array(labels)
    return (labels, {"name": name, "metadata": volume_metadata(volume), **geometry_kwargs(like.geometry)}, "labels")


def _transform_matrix(attributes: Mapping[str, Any], ndim: int) -> np.ndarray:
    """The (ndim+1)^2 data-to-world matrix napari builds from layer transform attributes."""
    from napari.utils.transforms import Affine

    physical = Affine(
        scale=attributes.get("scale", (1.0,) * ndim),
        translate=attributes.get("translate", (0.0,) * ndim),
        rotate=attributes.get("rotate"),
        shear=attributes.get("shear"),
        ndim=ndim,
    ).affine_matrix
    extra = attributes.get("affine")
    if extra is None:
        return physical
    extra = extra.affine_matrix if hasattr(extra, "affine_matrix") else np.asarray(extra, dtype=float)
    return extra @ physical


def _geometry_from_matrix(matrix: np.ndarray) -> Geometry:
    """Geometry of a (z, y, x) index -> (z, y, x) mm affine; fails for shears."""
    rev = np.eye(4)[[2, 1, 0, 3]]
    xyz = rev @ matrix @ rev
    linear = xyz[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0):
        raise ValueError("the layer transform is degenerate (zero scale)")
    direction = linear / spacing[None, :]
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-6):
        raise ValueError("the layer transform has a shear; it cannot be written as a scan geometry")
    return Geometry(tuple(spacing), tuple(xyz[:3, 3]), tuple(direction.ravel()))


def geometry_from_attributes(attributes: Mapping[str, Any], shape: tuple[int, ...]) -> Geometry:
    """Geometry for layer data: from our metadata when present, else from its transform.

    The metadata geometry is exact and wins when its grid shape matches ``shape``. Without
    it (e.g. a Labels layer drawn by hand), the geometry is rebuilt from the layer's
    scale/translate/rotate/shear/affine, which is exact when the layer shares the
    image layer's transform.
    """
    if len(shape) != 3:
        raise ValueError(f"only 3D (z, y, x) layers can be written as scans; got shape {tuple(shape)}")
    entry = (attributes.get("metadata") or {}).get(METADATA_KEY) or {}
    if "geometry" in entry and list(entry.get("shape", shape)) == list(shape):
        return Geometry.from_dict(entry["geometry"])
    return _geometry_from_matrix(_transform_matrix(attributes, 3))


def volume_from_layer(data: Any, attributes: Mapping[str, Any]) -> Volume:
    """A Volume of a layer's data (as napari passes it to writers) on its physical grid."""
    array = np.asarray(data)
    entry = (attributes.get("metadata") or {}).get(METADATA_KEY) or {}
    geometry = geometry_from_attributes(attributes, array.shape)
    return Volume(array=array, geometry=geometry, modality=entry.get("modality"))


def add_labels_like(
    viewer: napari.Viewer, image: Image, name: str | None = None, data: np.ndarray | None = None
) -> Labels:
    """Add an empty (or given) Labels layer on ``image``'s grid, carrying its geometry."""
    shape = tuple(image.data.shape)
    labels = np.zeros(shape, dtype=np.uint8) if data is None else np.asarray(data)
    if labels.shape != shape:
        raise ValueError(f"labels shape {labels.shape} does not match the image grid {shape}")
    metadata = {METADATA_KEY: dict(image.metadata.get(METADATA_KEY) or {})}
    if "geometry" not in metadata[METADATA_KEY]:
        geometry = _geometry_from_matrix(_transform_matrix(image._get_state(), 3))
        metadata[METADATA_KEY].update({"geometry": geometry.to_dict(), "shape": list(shape)})
    return viewer.add_labels(
        labels,
        name=name or f"{image.name} labels",
        metadata=metadata,
        scale=image.scale,
        translate=image.translate,
        rotate=image.rotate,
        shear=image.shear,
        affine=image.affine,
        **({"units": image.units} if _layers_have_units() else {}),
    )
