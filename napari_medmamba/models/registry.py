"""Model registry: name -> factory, input contract, weights file and sha256.

Every registered model is exercised by the tests (forward and backward on CPU).
The input contract is what the inference engine needs to feed a model correctly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch.nn as nn

__all__ = ["WEIGHTS_DIR", "InputContract", "ModelSpec", "register", "get_model_spec", "list_models", "REGISTRY",
           "mirrored_class_order"]

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
"""The package's weights folder (the top-level ``weights/`` of the source tree, packaged into the wheel)."""


@dataclass(frozen=True)
class InputContract:
    """How a model expects its input, and what its output channels mean."""

    spatial_dims: Literal[2, 3]
    """3: the network takes 3D patches; 2: it takes 2D slices (applied slice by slice to volumes)."""
    in_channels: int
    label_names: tuple[str, ...]
    """One name per output class; index 0 is background."""
    label_colors: tuple[str, ...]
    """One '#rrggbb' colour per class (background first)."""
    patch_size: tuple[int, ...]
    """Default sliding-window patch, (z, y, x) for 3D, (y, x) for 2D; every axis divisible by the net's stride."""
    target_spacing: tuple[float, float, float] | None = None
    """Working spacing (z, y, x) in mm, or None to keep the scan's own spacing."""
    orientation: str | None = "RAS"
    """Orientation code (as SimpleITK's DICOMOrient takes it) the network was trained in."""
    modality: Literal["CT", "MR", "any"] = "any"
    normalization: Literal["zscore", "ct"] = "zscore"
    """'zscore': per-volume z-score (MR); 'ct': clip to ``ct_window`` then z-score with ``ct_stats``."""
    ct_window: tuple[float, float] | None = None
    ct_stats: tuple[float, float] | None = None
    """(mean, std) in HU used after windowing, for normalization == 'ct'."""
    slice_axis: int = 0
    """For 2D models: the array axis (z=0, y=1, x=2) the model is applied along."""
    pad_to_patch: bool = True
    """True: a volume smaller than the patch is zero-padded up to the full patch (how the shipped models were
    trained); False: tiles are capped to the volume (``sliding_window.tile_for``), as fine-tuned models train."""
    largest_component_classes: tuple[int, ...] = ()
    """Recommended clean-up: the classes (label values) whose largest connected component alone is kept,
    chosen by measuring on validation cases; empty: no clean-up is recommended. Plain data, turned into an
    engine ``Postprocess`` by ``napari_medmamba.inference.postprocessing.recommended_postprocess``."""
    lr_label_pairs: tuple[tuple[int, int], ...] = ()
    """Label pairs that trade places in a left-right mirror image (a right and a left organ): training's
    left-right flip augmentation swaps them (and the partial-label flags), so that a flipped patch still
    says which side is which; the engine's left-right mirroring swaps them back (``mirrored_class_order``)."""

    body_threshold_hu: float | None = None
    """CT models: tile only the bounding box of the body (pieces above this HU, plus a margin; see
    ``inference.body_crop``); everything outside it is background. None: the whole volume is tiled."""
    mirror_axes: tuple[int, ...] = ()
    """(z, y, x) axes along which ``segment(mirror=True)`` also predicts on mirrored tiles and averages
    (test-time mirroring); only axes where a mirror image is still a valid input (left-right, x, for RAS
    models; ``lr_label_pairs`` are swapped back). Chosen by measuring on validation cases."""
    max_tile_growth: float = 0.25
    """A volume at most this fraction longer than the patch along an axis runs as one grown tile along it
    (``sliding_window.tile_with_slack``), instead of several overlapping windows."""

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


def mirrored_class_order(pairs: Sequence[tuple[int, int]], num_classes: int) -> list[int]:
    """Class indices with each (right, left) pair of ``pairs`` swapped: indexing a per-class axis (probability
    channels, partial-label flags) with it turns what a left-right mirror image says back into the original's."""
    order = list(range(num_classes))
    for a, b in pairs:
        order[a], order[b] = b, a
    return order


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: how to build it, how to feed it, where its weights are."""

    name: str
    factory: Callable[[], nn.Module]
    contract: InputContract
    description: str = ""
    weights: str | None = None
    """File name of shipped weights under the package's weights folder (safetensors), if any."""
    sha256: str | None = None
    card: dict = field(default_factory=dict)


REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add ``spec`` to the registry (a name can be registered once)."""
    if spec.name in REGISTRY:
        raise ValueError(f"model {spec.name!r} is already registered")
    REGISTRY[spec.name] = spec
    return spec


def get_model_spec(name: str) -> ModelSpec:
    """The spec registered under ``name``; a clear error listing the known names otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(sorted(REGISTRY)) or 'none'}") from None


def list_models() -> list[str]:
    return sorted(REGISTRY)
