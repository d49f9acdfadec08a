"""Patch sampling (NumPy, CPU) and batched data augmentation (torch, any device).

Arrays are (z, y, x) in the model contract's orientation (RAS: x is the left-right axis), so the only
flip is along x; flipping y or z would swap anterior and posterior hippocampus (or head and tail). A
left-right flip turns a right organ into a left one: labels given as ``lr_label_pairs`` (the contract's)
swap with it, and so do their partial-label flags.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..models.registry import mirrored_class_order

__all__ = ["PatchSampler", "AugmentConfig", "Augmented", "augment_batch"]


class PatchSampler:
    """Random patches of ``patch_size`` from (image, label) volumes; volumes smaller than the patch are
    padded with ``pad_value`` (label 0); a ``fg_fraction`` of the patches is centred on a random foreground voxel.

    ``cap_multiple``: patches no larger than the batch's volumes (each axis: the largest of the batch's volume
    sizes rounded up to this multiple, at most ``patch_size``), as the inference engine tiles a volume cut to
    the body. None: always ``patch_size``."""

    def __init__(self, images: Sequence[np.ndarray], labels: Sequence[np.ndarray], patch_size: Sequence[int],
                 fg_fraction: float = 1 / 3, pad_value: float = 0.0, cap_multiple: int | None = None) -> None:
        if len(images) != len(labels) or not images:
            raise ValueError("need the same positive number of images and labels")
        self.images, self.labels = list(images), list(labels)
        self.patch = tuple(int(p) for p in patch_size)
        self.fg_fraction = fg_fraction
        self.pad_value = float(pad_value)
        self.cap_multiple = cap_multiple
        self.fg = [np.flatnonzero(lb.ravel() > 0) for lb in self.labels]

    def _crop(self, i: int, start: Sequence[int], patch: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        im, lb = self.images[i], self.labels[i]
        out_im = np.full(patch, self.pad_value, np.float32)
        out_lb = np.zeros(patch, np.int64)
        src, dst = [], []
        for s, n, p in zip(start, im.shape, patch):
            a, b = max(s, 0), min(s + p, n)
            src.append(slice(a, b))
            dst.append(slice(a - s, b - s))
        out_im[tuple(dst)] = im[tuple(src)]
        out_lb[tuple(dst)] = lb[tuple(src)]
        return out_im, out_lb

    def sample(self, batch_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(B, 1, *patch) float32 images and (B, *patch) int64 labels."""
        ims, lbs, _ = self.sample_with_cases(batch_size, rng)
        return ims, lbs

    def _patch_for(self, cases: Sequence[int]) -> tuple[int, ...]:
        if self.cap_multiple is None:
            return self.patch
        m = self.cap_multiple
        return tuple(min(p, max(-(-self.images[i].shape[a] // m) * m for i in cases))
                     for a, p in enumerate(self.patch))

    def sample_with_cases(self, batch_size: int, rng: np.random.Generator
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As :meth:`sample`, plus the (B,) index of the case each patch came from."""
        capped = self.cap_multiple is not None
        # capped: the cases are drawn first, since they decide the patch size
        cases = [int(rng.integers(len(self.images))) for _ in range(batch_size)] if capped else []
        patch = self._patch_for(cases)
        ims, lbs, idx = [], [], []
        for k in range(batch_size):
            i = cases[k] if capped else int(rng.integers(len(self.images)))
            idx.append(i)
            shape = self.images[i].shape
            if rng.random() < self.fg_fraction and self.fg[i].size:
                centre = np.unravel_index(int(self.fg[i][rng.integers(self.fg[i].size)]), shape)
                start = [int(c) - p // 2 for c, p in zip(centre, patch)]
            else:
                start = [int(rng.integers(min(0, n - p), max(0, n - p) + 1)) for n, p in zip(shape, patch)]
            # keep the patch on the volume as much as possible (no patch of mostly padding)
            start = [min(max(s, min(0, n - p)), max(0, n - p)) for s, n, p in zip(start, shape, patch)]
            im, lb = self._crop(i, start, patch)
            ims.append(im)
            lbs.append(lb)
        return np.stack(ims)[:, None], np.stack(lbs), np.asarray(idx, dtype=np.int64)


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities (per sample) and ranges of the augmentations."""

    p_flip_lr: float = 0.5
    p_affine: float = 0.3
    max_rotation_deg: float = 15.0
    scale: tuple[float, float] = (0.85, 1.15)
    p_intensity_scale: float = 0.15
    intensity_scale: tuple[float, float] = (0.75, 1.25)
    p_shift: float = 0.15
    shift: float = 0.1
    p_gamma: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.5)
    p_noise: float = 0.15
    noise_std: tuple[float, float] = (0.0, 0.1)
    in_plane_only: bool = False
    """Rotate about the z axis only (for 2D models trained on single axial slices)."""


def _rotation(angles: np.ndarray) -> np.ndarray:
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


class Augmented(NamedTuple):
    """An augmented batch: images, labels, the optional mask and partial-label flags, moved alike."""

    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor | None
    present: torch.Tensor | None


def _swap_labels(y: torch.Tensor, pairs: Sequence[tuple[int, int]]) -> torch.Tensor:
    out = y.clone()
    for a, c in pairs:
        out[y == a] = c
        out[y == c] = a
    return out


def augment_batch(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator,
                  cfg: AugmentConfig = AugmentConfig(), mask: torch.Tensor | None = None,
                  lr_label_pairs: Sequence[tuple[int, int]] = (), present: torch.Tensor | None = None
                  ) -> Augmented:
    """Augment images ``x`` (B, 1, Z, Y, X) and labels ``y`` (B, Z, Y, X) (and an optional bool ``mask``
    of the same shape, moved like the labels). Random parameters come from ``rng`` (NumPy, CPU); the
    gaussian noise from torch's generator on ``x``'s device. Labels use nearest-neighbour sampling.

    ``lr_label_pairs``: (right, left) label pairs that swap in a left-right flipped sample; ``present``
    (B, C) bool partial-label flags, whose columns of those pairs swap with them (returned, else None)."""
    b, dev = x.shape[0], x.device
    # left-right flip (x axis) only
    flip = torch.as_tensor(rng.random(b) < cfg.p_flip_lr, device=dev)
    if bool(flip.any()):
        x = torch.where(flip.view(b, 1, 1, 1, 1), x.flip(-1), x)
        y_flipped = y.flip(-1)
        if lr_label_pairs:
            y_flipped = _swap_labels(y_flipped, lr_label_pairs)
            if present is not None:
                swapped = present[:, mirrored_class_order(lr_label_pairs, present.shape[1])]
                present = torch.where(flip.view(b, 1).to(present.device), swapped, present)
        y = torch.where(flip.view(b, 1, 1, 1), y_flipped, y)
        if mask is not None:
            mask = torch.where(flip.view(b, 1, 1, 1), mask.flip(-1), mask)
    # rotation + isotropic scaling
    do_aff = rng.random(b) < cfg.p_affine
    if do_aff.any():
        theta = np.zeros((b, 3, 4))
        for i in range(b):
            if do_aff[i]:
                ang = np.deg2rad(rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg, 3))
                if cfg.in_plane_only:
                    ang[:2] = 0.0
                theta[i, :, :3] = _rotation(ang) / rng.uniform(*cfg.scale)
            else:
                theta[i, :, :3] = np.eye(3)
        th = torch.as_tensor(theta, dtype=torch.float32, device=dev)
        grid = F.affine_grid(th, list(x.shape), align_corners=False)
        x = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        extra = [y.float().unsqueeze(1)] + ([mask.float().unsqueeze(1)] if mask is not None else [])
        moved = F.grid_sample(torch.cat(extra, 1), grid, mode="nearest", padding_mode="zeros", align_corners=False)
        y = moved[:, 0].round().long()
        if mask is not None:
            mask = moved[:, 1] > 0.5
    # intensity: multiplicative scale, additive shift, gamma, noise
    def per_sample(p: float, lo: float, hi: float, neutral: float) -> torch.Tensor:
        v = np.where(rng.random(b) < p, rng.uniform(lo, hi, b), neutral)
        return torch.as_tensor(v, dtype=x.dtype, device=dev).view(b, 1, 1, 1, 1)

    x = x * per_sample(cfg.p_intensity_scale, *cfg.intensity_scale, 1.0)
    x = x + per_sample(cfg.p_shift, -cfg.shift, cfg.shift, 0.0)
    gamma = per_sample(cfg.p_gamma, *cfg.gamma, 1.0)
    if bool((gamma != 1).any()):
        flat = x.flatten(1)
        lo, hi = flat.min(1).values.view(b, 1, 1, 1, 1), flat.max(1).values.view(b, 1, 1, 1, 1)
        rngv = (hi - lo).clamp_min(1e-6)
        x = ((x - lo) / rngv).clamp(0, 1).pow(gamma) * rngv + lo
    std = per_sample(cfg.p_noise, *cfg.noise_std, 0.0)
    if bool((std > 0).any()):
        x = x + torch.randn_like(x) * std
    return Augmented(x, y, mask, present)
