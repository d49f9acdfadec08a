"""npe2 sample data: offline scans shipped by installed packages."""

from __future__ import annotations

from typing import Any

from ..samples import load_sample
from ._layers import image_layer_data

__all__ = ["mni152_t1", "mni152_t1_right_hippocampus"]


def mni152_t1() -> list[tuple[Any, dict[str, Any], str]]:
    """The MNI ICBM152 2009a T1 template shipped by nilearn, as an Image layer."""
    return [image_layer_data(load_sample("mni152_t1"), name="MNI152 T1")]


def mni152_t1_right_hippocampus() -> list[tuple[Any, dict[str, Any], str]]:
    """A box of the MNI152 T1 template around the right hippocampus (the hippocampus model's field of view)."""
    return [image_layer_data(load_sample("mni152_t1_right_hippocampus"), name="MNI152 T1 right hippocampus")]
