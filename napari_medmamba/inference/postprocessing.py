"""Clean-up of label maps, class by class: largest component, hole filling, small islands."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from scipy import ndimage
from skimage import measure

__all__ = ["POSTPROCESS_CHOICES", "Postprocess", "keep_largest_component", "fill_holes", "remove_small_islands",
           "apply_postprocess", "recommended_postprocess", "postprocess_for", "describe_postprocess"]

POSTPROCESS_CHOICES = ("recommended", "none", "largest")
"""What the CLI's ``--postprocess`` and the napari widget's Clean-up offer (see :func:`postprocess_for`)."""


def _classes(labels: np.ndarray, classes: Iterable[int] | None) -> list[int]:
    present = [int(c) for c in np.unique(labels) if c != 0]
    return present if classes is None else [c for c in classes if c in present]


def _bbox(mask: np.ndarray) -> tuple[slice, ...]:
    return ndimage.find_objects(mask.astype(np.uint8))[0]


def keep_largest_component(labels: np.ndarray, classes: Iterable[int] | None = None) -> np.ndarray:
    """Keep only the largest 26-connected component of each class (others become background)."""
    out = labels.copy()
    for c in _classes(labels, classes):
        box = _bbox(labels == c)
        mask = labels[box] == c
        components = measure.label(mask, connectivity=mask.ndim)
        if components.max() > 1:
            sizes = np.bincount(components.ravel())
            sizes[0] = 0
            out[box][mask & (components != int(np.argmax(sizes)))] = 0
    return out


def fill_holes(labels: np.ndarray, classes: Iterable[int] | None = None) -> np.ndarray:
    """Fill background cavities fully enclosed by one class (other classes are left untouched)."""
    out = labels.copy()
    for c in _classes(labels, classes):
        box = _bbox(labels == c)
        filled = ndimage.binary_fill_holes(labels[box] == c)
        region = out[box]
        region[filled & (region == 0)] = c
    return out


def remove_small_islands(labels: np.ndarray, min_voxels: int, classes: Iterable[int] | None = None) -> np.ndarray:
    """Set components with fewer than ``min_voxels`` voxels (26-connected, per class) to background."""
    out = labels.copy()
    if min_voxels <= 1:
        return out
    for c in _classes(labels, classes):
        box = _bbox(labels == c)
        components = measure.label(labels[box] == c, connectivity=labels.ndim)
        small = np.bincount(components.ravel()) < min_voxels
        small[0] = False
        out[box][small[components]] = 0
    return out


@dataclass(frozen=True)
class Postprocess:
    """Which clean-up steps :func:`apply_postprocess` runs, in this order."""

    min_island_ml: float = 0.0
    """Remove components smaller than this volume in millilitres (0: keep all)."""
    largest_component: bool | tuple[int, ...] = False
    """True: every class; a tuple: only these classes."""
    fill_holes: bool | tuple[int, ...] = False


def _selection(option: bool | tuple[int, ...]) -> tuple[bool, Iterable[int] | None]:
    if isinstance(option, bool):
        return option, None
    return True, option


def apply_postprocess(
    labels: np.ndarray, config: Postprocess, voxel_volume_ml: float, cancel: Callable[[], None] = lambda: None
) -> np.ndarray:
    """Run the steps of ``config`` on ``labels``; ``cancel`` is called between steps (it may raise)."""
    if config.min_island_ml > 0:
        labels = remove_small_islands(labels, int(np.ceil(config.min_island_ml / voxel_volume_ml)))
        cancel()
    run, classes = _selection(config.largest_component)
    if run:
        labels = keep_largest_component(labels, classes)
        cancel()
    run, classes = _selection(config.fill_holes)
    if run:
        labels = fill_holes(labels, classes)
    return labels


def _contract(model: Any) -> Any:
    """The InputContract of a registry name (or stored fine-tuned model), a ModelSpec, a contract or a
    ``(net, contract[, name])`` tuple."""
    from ..models.registry import InputContract, ModelSpec

    if isinstance(model, InputContract):
        return model
    if isinstance(model, tuple) and len(model) > 1 and isinstance(model[1], InputContract):
        return model[1]
    if isinstance(model, (str, ModelSpec)):
        from .engine import resolve_spec  # engine imports this module: resolve lazily

        return resolve_spec(model).contract
    raise TypeError("model must be a registry name, a ModelSpec, an InputContract or (module, contract[, name])")


def recommended_postprocess(model: Any) -> Postprocess | None:
    """The clean-up recommended for ``model`` (its contract's ``largest_component_classes``), or None.

    ``model`` is a registry name, a ModelSpec, an InputContract or a ``(net, contract[, name])`` tuple.
    For ``lightm_unet_3d_hn_oar``: the largest component of brainstem, both parotids, larynx and mandible
    (not the spinal cord, which may be predicted in pieces). :func:`~napari_medmamba.inference.segment`
    does no clean-up unless asked: ``segment(scan, name, postprocess=recommended_postprocess(name))``.
    """
    contract = _contract(model)
    classes = tuple(int(c) for c in contract.largest_component_classes if 0 < int(c) < contract.num_classes)
    return Postprocess(largest_component=classes) if classes else None


def postprocess_for(choice: str, model: Any) -> Postprocess | None:
    """The Postprocess for a :data:`POSTPROCESS_CHOICES` entry: 'recommended' (:func:`recommended_postprocess`),
    'none' (None) or 'largest' (largest component of every class)."""
    if choice == "recommended":
        return recommended_postprocess(model)
    if choice == "none":
        return None
    if choice == "largest":
        return Postprocess(largest_component=True)
    raise ValueError(f"postprocess must be one of {', '.join(POSTPROCESS_CHOICES)}, got {choice!r}")


def describe_postprocess(config: Postprocess | None, label_names: Sequence[str] | None = None) -> str:
    """Words for a clean-up, e.g. 'none' or 'largest component of brainstem, larynx' (class names from
    ``label_names`` when given, else 'classes 1, 6')."""

    def which(option: bool | tuple[int, ...]) -> str:
        if option is True:
            return "every class"
        if label_names is not None and all(0 < c < len(label_names) for c in option):
            return ", ".join(label_names[c] for c in option)
        return "classes " + ", ".join(str(c) for c in option)

    if config is None:
        return "none"
    steps = []
    if config.min_island_ml > 0:
        steps.append(f"islands under {config.min_island_ml:g} mL removed")
    if config.largest_component:
        steps.append(f"largest component of {which(config.largest_component)}")
    if config.fill_holes:
        steps.append(f"holes filled in {which(config.fill_holes)}")
    return "; ".join(steps) or "none"
