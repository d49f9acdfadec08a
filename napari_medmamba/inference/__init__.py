"""Inference engine: ``segment(volume, model)`` -> labels, probabilities and uncertainty on the scan's grid.

Qt-free. See docs/inference.md. Names load on first use, so that a submodule without SimpleITK
(``body_crop``, ``postprocessing``) can be imported where SimpleITK is not installed (a training machine).
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "DEFAULT_OVERLAP": "engine", "FAST_SPACING_FACTOR": "engine", "SegmentationResult": "engine",
    "resolve_model": "engine", "segment": "engine",
    "SegmentationCancelled": "errors", "SegmentationInputError": "errors",
    "POSTPROCESS_CHOICES": "postprocessing", "Postprocess": "postprocessing", "apply_postprocess": "postprocessing",
    "describe_postprocess": "postprocessing", "fill_holes": "postprocessing",
    "keep_largest_component": "postprocessing", "postprocess_for": "postprocessing",
    "recommended_postprocess": "postprocessing", "remove_small_islands": "postprocessing",
    "normalize": "preprocessing",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
