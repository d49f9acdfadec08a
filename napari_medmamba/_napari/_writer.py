"""npe2 writer: a Labels layer -> NIfTI/NRRD/MetaImage on its source scan's grid.

npe2 writers only see ``(path, data, attributes)``, so the grid must travel with the layer:

1. ``attributes["metadata"]["medmamba"]["geometry"]`` (set by our reader and by
   ``_layers.add_labels_like`` / ``labels_layer_data``) is used when its shape matches;
2. otherwise the geometry is rebuilt from the layer's scale/translate/rotate/affine, which is
   exact when the Labels layer was given the image layer's transform. A Labels layer made
   with napari's "new labels" button over a rotated or flipped scan does not share it: create
   labels with our helpers, or copy the image layer's ``metadata`` into the labels layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..io import write_labels
from ._layers import volume_from_layer

__all__ = ["write_labels_layer"]


def write_labels_layer(path: str, data: Any, attributes: Mapping[str, Any]) -> list[str]:
    """npe2 single-layer writer: geometry from ``metadata["medmamba"]``, else the layer transform."""
    volume = volume_from_layer(data, attributes)
    return [str(write_labels(volume.array, like=volume, path=path))]
