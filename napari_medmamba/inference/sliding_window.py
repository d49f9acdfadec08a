"""Gaussian-weighted sliding-window prediction over a (C, z, y, x) volume, tiles batched.

A 2D model runs through the same code with a (1, y, x) patch: each tile is one slice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Callable

import numpy as np
import torch

from .errors import SegmentationCancelled

__all__ = ["TILE_SLACK", "gaussian_importance", "sliding_window", "tile_for", "tile_grid", "tile_starts", "tile_with_slack"]


def gaussian_importance(patch_size: tuple[int, ...], sigma_scale: float = 0.125) -> torch.Tensor:
    """Importance map peaking at the patch centre (sigma = ``sigma_scale`` x patch), max 1, no zeros."""
    grids = []
    for n in patch_size:
        sigma = max(n * sigma_scale, 1e-6)
        x = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
        grids.append(np.exp(-0.5 * (x / sigma) ** 2))
    w = grids[0]
    for g in grids[1:]:
        w = np.multiply.outer(w, g)
    w = w / w.max()
    w = np.maximum(w, w[w > 0].min() if np.any(w > 0) else 1.0)
    return torch.from_numpy(w.astype(np.float32))


def tile_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Evenly spaced window starts covering ``size`` with windows of ``patch`` (size >= patch)."""
    if size <= patch:
        return [0]
    step = max(1, int(patch * (1.0 - overlap)))
    n = math.ceil((size - patch) / step) + 1
    return [int(round(i * (size - patch) / (n - 1))) for i in range(n)]


def tile_grid(shape: tuple[int, ...], patch_size: tuple[int, ...], overlap: float) -> list[tuple[slice, ...]]:
    """All windows (as slices) over a padded spatial ``shape``, in raster order."""
    per_axis = [tile_starts(s, p, overlap) for s, p in zip(shape, patch_size)]
    tiles: list[tuple[slice, ...]] = [()]
    for starts, p in zip(per_axis, patch_size):
        tiles = [t + (slice(s, s + p),) for t in tiles for s in starts]
    return tiles


def sliding_window(
    image: torch.Tensor,
    predict: Callable[[torch.Tensor], torch.Tensor],
    batch_size: Callable[[], int],
    patch_size: tuple[int, int, int],
    overlap: float,
    num_classes: int,
    progress: Callable[[float], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Class probabilities (num_classes, z, y, x), float32, for a (C, z, y, x) CPU image.

    ``predict`` maps a (B, C, *patch) batch to (B, num_classes, *patch) probabilities on the
    CPU; ``batch_size()`` is read before every batch (it may shrink after an OOM). The
    image (already normalised) is padded at the far end with 0 up to the patch size, windows are
    blended with Gaussian importance weights, and the padding is cropped away again.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    spatial = tuple(image.shape[1:])
    padded = tuple(max(s, p) for s, p in zip(spatial, patch_size))
    if padded != spatial:
        pad: list[int] = []
        for s, p in zip(reversed(spatial), reversed(padded)):
            pad += [0, p - s]
        image = torch.nn.functional.pad(image, pad, value=0.0)  # 0 = the normalised mean, as in training
    tiles = tile_grid(padded, patch_size, overlap)
    weight = gaussian_importance(patch_size)
    probs = torch.zeros((num_classes, *padded), dtype=torch.float32)
    norm = torch.zeros(padded, dtype=torch.float32)
    done = 0
    while done < len(tiles):
        if cancel is not None and cancel():
            raise SegmentationCancelled("segmentation cancelled during inference")
        batch = tiles[done : done + max(1, batch_size())]
        out = predict(torch.stack([image[(slice(None), *t)] for t in batch]))
        for tile, tile_probs in zip(batch, out):
            probs[(slice(None), *tile)] += tile_probs * weight
            norm[tile] += weight
        done += len(batch)
        if progress is not None:
            progress(done / len(tiles))
    probs /= norm
    return probs[(slice(None), *(slice(0, s) for s in spatial))].contiguous()


TILE_SLACK = 0.25
"""A volume at most this fraction larger than the patch along an axis runs as one grown tile along it."""


def tile_with_slack(shape: Sequence[int], patch: Sequence[int], stride: int = 1,
                    slack: float = TILE_SLACK) -> tuple[int, ...]:
    """``patch``, grown to ``shape`` (rounded up to ``stride``) along axes that exceed it by at most ``slack``.

    A volume a few voxels larger than the patch then runs as one tile (about 1.1x the work) instead of two
    overlapping windows (2x). Used for models padded to their full patch (``pad_to_patch=True``).
    """
    return tuple(-(-int(n) // stride) * stride if p < n <= p * (1 + slack) else int(p) for n, p in zip(shape, patch))


def tile_for(shape: Sequence[int], patch: Sequence[int], stride: int = 1) -> tuple[int, ...]:
    """``patch``, but no larger than ``shape`` rounded up to ``stride`` on any axis (and never under two strides,
    so the coarsest feature map keeps 2 voxels per axis for instance norms): a small volume is not padded up to a
    large patch. (Padding changes what a Mamba layer sees, which scans the whole tile as one sequence;
    fine-tuning trains on tiles of this size, so inference uses them too.)"""
    return tuple(min(int(p), max(2 * stride, -(-int(n) // stride) * stride)) for n, p in zip(shape, patch))

