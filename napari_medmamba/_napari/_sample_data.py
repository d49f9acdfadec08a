"""npe2 sample data: offline scans shipped by installed packages."""

from __future__ import annotations

import textwrap
from typing import Any

import numpy as np

from ..samples import ct_hint, load_sample
from ._layers import image_layer_data

__all__ = ["ct_open_your_own", "mni152_t1", "mni152_t1_right_hippocampus"]


def mni152_t1() -> list[tuple[Any, dict[str, Any], str]]:
    """The MNI ICBM152 2009a T1 template shipped by nilearn, as an Image layer."""
    return [image_layer_data(load_sample("mni152_t1"), name="MNI152 T1")]


def mni152_t1_right_hippocampus() -> list[tuple[Any, dict[str, Any], str]]:
    """A box of the MNI152 T1 template around the right hippocampus (the hippocampus model's field of view)."""
    return [image_layer_data(load_sample("mni152_t1_right_hippocampus"), name="MNI152 T1 right hippocampus")]


def ct_open_your_own() -> list[tuple[Any, dict[str, Any], str]]:
    """No CT can ship offline: one line on how to open and segment one's own CT, as a notification and as a
    text-only Points layer (napari refuses a sample without layers)."""
    from napari.utils.notifications import show_info

    hint = ct_hint()
    show_info(hint)
    text = {"string": {"constant": "\n".join(textwrap.wrap(hint, 64))}, "size": 11, "color": "white",
            "anchor": "center"}
    return [(np.zeros((1, 2)), {"name": "How to open your own CT", "text": text, "size": 1,
                                "face_color": "transparent", "border_color": "transparent"}, "points")]
