"""NumPy arrays that share memory with a SimpleITK image instead of copying it.

``sitk.GetArrayFromImage`` copies the pixel buffer, so reading a scan briefly needs twice
its size. ``array_from_image`` returns a writable (z, y, x) array over the image's own
buffer and keeps the image alive for as long as the array (or any view of it) exists.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import SimpleITK as sitk

__all__ = ["array_from_image"]


class _ImageBuffer:
    """Exposes a SimpleITK image's pixel buffer through the NumPy array interface."""

    def __init__(self, image: sitk.Image) -> None:
        self.image = image  # owning reference: the buffer lives as long as this object
        view = sitk.GetArrayViewFromImage(image)
        interface = dict(view.__array_interface__)
        interface["data"] = (interface["data"][0], False)  # the image is ours alone: writable
        self.__array_interface__: dict[str, Any] = interface


def array_from_image(image: sitk.Image) -> np.ndarray:
    """A writable (z, y, x) view of ``image``'s pixels, without a copy.

    The returned array's ``base`` holds ``image``; do not modify the image's pixels
    through SimpleITK afterwards (treat the array as the owner).
    """
    return np.asarray(_ImageBuffer(image))
