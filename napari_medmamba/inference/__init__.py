"""Inference engine: ``segment(volume, model)`` -> labels, probabilities and uncertainty on the scan's grid.

Qt-free. See docs/inference.md.
"""

from .engine import DEFAULT_OVERLAP, FAST_SPACING_FACTOR, SegmentationResult, resolve_model, segment
from .errors import SegmentationCancelled, SegmentationInputError
from .postprocessing import (
    POSTPROCESS_CHOICES,
    Postprocess,
    apply_postprocess,
    describe_postprocess,
    fill_holes,
    keep_largest_component,
    postprocess_for,
    recommended_postprocess,
    remove_small_islands,
)
from .preprocessing import normalize

__all__ = [
    "DEFAULT_OVERLAP",
    "FAST_SPACING_FACTOR",
    "POSTPROCESS_CHOICES",
    "Postprocess",
    "SegmentationCancelled",
    "SegmentationInputError",
    "SegmentationResult",
    "apply_postprocess",
    "describe_postprocess",
    "fill_holes",
    "keep_largest_component",
    "normalize",
    "postprocess_for",
    "recommended_postprocess",
    "remove_small_islands",
    "resolve_model",
    "segment",
]
