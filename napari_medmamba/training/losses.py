"""Soft Dice + cross-entropy with an ignore mask, and the per-class Dice metric."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["dice_ce_loss", "dice_per_class"]


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, ignore_mask: torch.Tensor | None = None,
                 smooth: float = 1e-5, include_background: bool = False,
                 present: torch.Tensor | None = None, ce_top_k: float | None = None,
                 class_balanced_ce: float = 0.0) -> torch.Tensor:
    """Cross-entropy plus (1 - soft Dice), batch Dice over foreground classes (nnU-Net style).

    ``logits`` (B, C, *spatial), ``target`` (B, *spatial) integer labels, ``ignore_mask`` (B, *spatial)
    bool, True where no loss is computed (neither CE nor Dice sees those voxels). Computed in float32.

    Partial labels: ``present`` (B, C) bool says which classes sample ``b`` has contoured. For a class that
    was not contoured, the label 0 of that sample means "background or that class": the loss is *marginal*
    (the probabilities of background and of every uncontoured class are summed before cross-entropy, and
    Dice of a class only counts samples that contoured it), so an uncontoured organ is never taught as
    background. With ``present`` None (or all True) this is the ordinary loss.

    ``ce_top_k`` (a fraction in (0, 1]): cross-entropy averaged over that fraction of the valid voxels with
    the largest loss only (nnU-Net's TopK loss), which keeps a small, not yet learned organ's voxels from
    being averaged away among millions of easy background voxels. ``class_balanced_ce`` > 0 adds that
    weight times the cross-entropy averaged per class first (over each labelled class's voxels), then over
    the classes: every class present in the batch pulls as hard as the background, however small it is.
    """
    if ce_top_k is not None and not 0.0 < ce_top_k <= 1.0:
        raise ValueError(f"ce_top_k must be in (0, 1], got {ce_top_k}")
    logits = logits.float()
    target = target.long()
    valid = torch.ones_like(target, dtype=torch.bool) if ignore_mask is None else ~ignore_mask.bool()
    n_valid = valid.sum()
    if n_valid == 0:
        return logits.sum() * 0.0
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    n_cls = logits.shape[1]
    spatial = [1] * (logits.dim() - 2)
    log_probs = torch.log_softmax(logits, dim=1)
    if present is None:
        present_b = torch.ones(logits.shape[0], n_cls, dtype=torch.bool, device=logits.device)
    else:
        present_b = present.to(device=logits.device, dtype=torch.bool).clone()
        present_b[:, 0] = True
    bg_members = ~present_b
    bg_members[:, 0] = True  # background and every class this sample did not contour
    bg_terms = log_probs.masked_fill(~bg_members.view(-1, n_cls, *spatial), float("-inf"))
    log_bg = torch.logsumexp(bg_terms, dim=1)
    log_p_target = log_probs.gather(1, safe_target.unsqueeze(1)).squeeze(1)
    ce_vox = -torch.where(safe_target == 0, log_bg, log_p_target)
    if ce_top_k is None:
        ce = (ce_vox * valid).sum() / n_valid
    else:
        k = max(1, int(ce_top_k * int(n_valid)))
        ce = torch.topk(torch.where(valid, ce_vox, torch.full_like(ce_vox, -1.0)).flatten(), k,
                        sorted=False).values.mean()
    probs = log_probs.exp()
    onehot = F.one_hot(safe_target, n_cls).movedim(-1, 1).to(probs.dtype)
    w = valid.unsqueeze(1).to(probs.dtype) * present_b.to(probs.dtype).view(-1, n_cls, *spatial)
    dims = [0] + list(range(2, logits.dim()))
    inter = (probs * onehot * w).sum(dims)
    denom = ((probs + onehot) * w).sum(dims)
    dice = (2 * inter + smooth) / (denom + smooth).clamp_min(1e-8)
    counted = present_b.any(0)
    if class_balanced_ce > 0:
        labelled = onehot * valid.unsqueeze(1).to(probs.dtype)
        voxels = labelled.sum(dims)
        per_class = (ce_vox.unsqueeze(1) * labelled).sum(dims) / voxels.clamp_min(1.0)
        ce = ce + class_balanced_ce * per_class[voxels > 0].mean()
    if not include_background:
        dice, counted = dice[1:], counted[1:]
    return ce + (1.0 - dice[counted].mean())


def dice_per_class(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """Hard Dice of classes 1..num_classes-1 for one case; NaN for a class absent from both arrays."""
    out = np.full(num_classes - 1, np.nan)
    for c in range(1, num_classes):
        p, t = pred == c, target == c
        denom = int(p.sum()) + int(t.sum())
        if denom:
            out[c - 1] = 2.0 * int(np.logical_and(p, t).sum()) / denom
    return out
