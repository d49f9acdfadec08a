"""The two exceptions of the inference engine."""

from __future__ import annotations

__all__ = ["SegmentationCancelled", "SegmentationInputError"]


class SegmentationInputError(ValueError):
    """The scan or the model cannot be segmented as given; the message says why and what to do."""


class SegmentationCancelled(RuntimeError):
    """The caller's cancel flag was raised; no partial result is returned."""
