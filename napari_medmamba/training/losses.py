"""Soft Dice + cross-entropy with an ignore mask, and the per-class Dice metric."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["dice_ce_loss", "dice_per_class"]


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, ignore_mask: torch.Tensor | None = None,
                 smooth: float = 1e-5, include_background: bool = False) -> torch.Tensor:
    """Cross-entropy plus (1 - soft Dice), batch Dice over foreground classes (nnU-Net style).

    ``logits`` (B, C, *spatial), ``target`` (B, *spatial) integer labels, ``ignore_mask`` (B, *spatial)
    bool, True where no loss is computed (neither CE nor Dice sees those voxels). Computed in float32.
    """
    logits = logits.float()
    target = target.long()
    valid = torch.ones_like(target, dtype=torch.bool) if ignore_mask is None else ~ignore_mask.bool()
    n_valid = valid.sum()
    if n_valid == 0:
        return logits.sum() * 0.0
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    ce = F.cross_entropy(logits, safe_target, reduction="none")
    ce = (ce * valid).sum() / n_valid
    probs = torch.softmax(logits, dim=1)
    onehot = F.one_hot(safe_target, logits.shape[1]).movedim(-1, 1).to(probs.dtype)
    w = valid.unsqueeze(1).to(probs.dtype)
    dims = [0] + list(range(2, logits.dim()))
    inter = (probs * onehot * w).sum(dims)
    denom = ((probs + onehot) * w).sum(dims)
    dice = (2 * inter + smooth) / (denom + smooth).clamp_min(1e-8)
    if not include_background:
        dice = dice[1:]
    return ce + (1.0 - dice.mean())


def dice_per_class(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """Hard Dice of classes 1..num_classes-1 for one case; NaN for a class absent from both arrays."""
    out = np.full(num_classes - 1, np.nan)
    for c in range(1, num_classes):
        p, t = pred == c, target == c
        denom = int(p.sum()) + int(t.sum())
        if denom:
            out[c - 1] = 2.0 * int(np.logical_and(p, t).sum()) / denom
    return out
