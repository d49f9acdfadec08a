"""The voxel limit that stops a huge scan from being loaded by accident."""

from __future__ import annotations

import os

__all__ = ["MAX_VOXELS_ENV", "DEFAULT_MAX_VOXELS", "default_max_voxels"]

MAX_VOXELS_ENV = "MEDMAMBA_MAX_VOXELS"
DEFAULT_MAX_VOXELS = 2**31
"""2 Gi voxels: 4 GiB as int16, 8 GiB as float32."""


def default_max_voxels() -> int:
    """The limit from the ``MEDMAMBA_MAX_VOXELS`` environment variable, else 2**31."""
    text = os.environ.get(MAX_VOXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_VOXELS
    try:
        value = int(float(text))
    except ValueError:
        raise ValueError(f"{MAX_VOXELS_ENV}={text!r} is not a number of voxels") from None
    if value <= 0:
        raise ValueError(f"{MAX_VOXELS_ENV}={text!r} must be positive")
    return value
